"""The offline API: ``LLM(model=...).generate(prompts, SamplingParams(...))``.

Shaped like vLLM's so code moves over unchanged: results come back in prompt order, each
with ``outputs[0].text``. Prompts are strings (tokenized with the tokenizer's BOS where it
adds one, as vLLM does), token-id lists, or, with :meth:`LLM.chat`, message lists rendered
by the model's chat template (which writes its own BOS).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvcake.common.config import load_config
from kvcake.common.errors import InvalidParamsError
from kvcake.engine.config import EngineConfig
from kvcake.engine.core import EngineCore
from kvcake.engine.request import RequestStatus
from kvcake.engine.scheduler import KVConnector
from kvcake.text import OutputProcessor, TextDelta, Tokenizer
from kvcake.wire.output import TokenOutput
from kvcake.wire.sampling import SamplingParams

Prompt = str | Sequence[int]
Message = Mapping[str, str]


@dataclass(frozen=True)
class CompletionOutput:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    stop_reason: str | int | None = None


@dataclass(frozen=True)
class GenerationResult:
    """One prompt's result. ``num_cached_tokens`` of the prompt were not recomputed."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int
    num_store_tokens: int
    ttft_s: float | None


@dataclass
class _Pending:
    prompt: str | None
    prompt_token_ids: list[int]
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class LLM:
    """A local engine: tokenizer, :class:`EngineCore` and output processing in one object."""

    def __init__(self, model: str = "smollm2", connector: KVConnector | None = None,
                 **overrides: Any) -> None:
        self.config: EngineConfig = load_config(EngineConfig, "engine",
                                                {"model": model, **overrides})
        self.core = EngineCore(self.config, connector=connector)
        self.tokenizer = Tokenizer.from_dir(self.core.files.path)
        self.outputs = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def close(self) -> None:
        self.core.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 tenant: str | None = None) -> list[GenerationResult]:
        """Run every prompt to completion (batched continuously); results in prompt order."""
        return self._generate(prompts, params, tenant, special_tokens=True)

    def _generate(self, prompts: Prompt | Sequence[Prompt],
                  params: SamplingParams | Sequence[SamplingParams] | None,
                  tenant: str | None, special_tokens: bool) -> list[GenerationResult]:
        batch = _as_prompt_list(prompts)
        per_prompt = _as_params_list(params, len(batch))
        pending: dict[str, _Pending] = {}
        try:
            for prompt, p in zip(batch, per_prompt, strict=True):
                request_id, item = self._submit(prompt, p, tenant, special_tokens)
                pending[request_id] = item
        except Exception:
            self._withdraw(pending)  # a refused prompt refuses its whole batch
            raise
        return self._drain(pending)

    def _withdraw(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self.core.abort(request_id)
            self.outputs.discard(request_id)

    def chat(self, conversations: Sequence[Message] | Sequence[Sequence[Message]],
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             tenant: str | None = None) -> list[GenerationResult]:
        """Like :meth:`generate` for chat message lists (one conversation or several)."""
        many = bool(conversations) and not isinstance(conversations[0], Mapping)
        convs: Sequence[Sequence[Message]] = (
            conversations if many else [conversations])  # type: ignore[list-item,assignment]
        prompts = [self.tokenizer.apply_chat_template(c) for c in convs]
        return self._generate(prompts, params, tenant, special_tokens=False)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               tenant: str | None = None) -> Iterator[TextDelta]:
        """Run one prompt, yielding its text as it is produced (the last delta is finished)."""
        request_id, _ = self._submit(prompt, params or SamplingParams(), tenant)
        try:
            while True:
                for output in self.core.step():
                    delta = self._process(output)
                    if output.request_id == request_id:
                        yield delta
                        if delta.finish_reason is not None:
                            return
        finally:
            self.core.abort(request_id)
            self.outputs.discard(request_id)

    def _process(self, output: TokenOutput) -> TextDelta:
        delta, stopped = self.outputs.process(output)
        if stopped:
            self.core.finish(output.request_id, RequestStatus.FINISHED_STOPPED)
        return delta

    def _submit(self, prompt: Prompt, params: SamplingParams, tenant: str | None,
                special_tokens: bool = True) -> tuple[str, _Pending]:
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt, special_tokens) if isinstance(prompt, str) \
            else list(prompt)
        request_id = f"llm-{next(self._ids)}"
        self.core.add_request(request_id, ids, params, tenant)
        self.outputs.add(request_id, params)
        return request_id, _Pending(text, ids)

    def _drain(self, pending: dict[str, _Pending]) -> list[GenerationResult]:
        results: dict[str, GenerationResult] = {}
        while len(results) < len(pending):
            for output in self.core.step():
                delta = self._process(output)
                item = pending[output.request_id]
                _collect(item, delta)
                if delta.finish_reason is not None:
                    results[output.request_id] = _result(
                        output.request_id, item, delta, output.num_cached_tokens,
                        output.num_store_tokens, output.first_token_s)
        return [results[request_id] for request_id in pending]


def _collect(item: _Pending, delta: TextDelta) -> None:
    item.text.append(delta.text)
    item.token_ids.extend(delta.token_ids)
    item.logprobs.extend(delta.logprobs)


def _result(request_id: str, item: _Pending, delta: TextDelta, cached: int, store: int,
            ttft_s: float | None) -> GenerationResult:
    completion = CompletionOutput("".join(item.text), item.token_ids, item.logprobs,
                                  delta.finish_reason, delta.stop_reason)
    return GenerationResult(request_id, item.prompt, item.prompt_token_ids, [completion],
                            cached, store, ttft_s)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]
    if not items:
        raise InvalidParamsError("no prompts given")
    return items  # type: ignore[return-value]


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None,
                    count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise InvalidParamsError(f"{len(params)} sampling params for {count} prompts")
    return list(params)
