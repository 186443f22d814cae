"""The Conductor as the API's :class:`~kvcake.api.Backend`: text in, routed tokens, text out.

Tokenizing (and the chat template), detokenizing and stop strings happen here, once, so the
instances see token ids only; tokenizing runs in a worker thread, off the event loop. Token
ids in log-probabilities are spelt out here too. With ``on_decode_failure="retry"`` a request
whose instance died is routed again as a continuation: the prompt plus every token already
streamed, for the tokens still owed, and the client's stream simply goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence

import msgspec

from kvcake.common.errors import InvalidParamsError
from kvcake.common.log import get_logger
from kvcake.conductor.flight import Flight, InstanceLostError
from kvcake.conductor.server import ConductorServer
from kvcake.text import OutputProcessor, Tokenizer
from kvcake.wire.generate import EchoedPrompt, GenerateChunk, GenerateRequest, TokenLogprob
from kvcake.wire.output import TokenOutput
from kvcake.wire.sampling import SamplingParams

log = get_logger(__name__)
_MAX_RETRIES = 2


class ConductorBackend:
    def __init__(self, server: ConductorServer, tokenizer: Tokenizer, model_name: str) -> None:
        self.server = server
        self.tokenizer = tokenizer
        self._model_name = model_name
        self._processor = OutputProcessor(tokenizer)
        self._spellings: dict[int, str] = {}

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def max_model_len(self) -> int:
        return self.server.max_model_len()

    def health(self) -> tuple[bool, dict[str, object]]:
        return self.server.health()

    def render_metrics(self) -> str:
        return self.server.render_metrics()

    async def tokenize(self, prompt: str | list[int] | None,
                       messages: tuple[dict[str, str], ...] | None,
                       add_special_tokens: bool = False,
                       add_generation_prompt: bool = True) -> list[int]:
        return await asyncio.to_thread(self._tokenize, prompt, messages, add_special_tokens,
                                       add_generation_prompt)

    def _tokenize(self, prompt: str | list[int] | None,
                  messages: tuple[dict[str, str], ...] | None, add_special_tokens: bool,
                  add_generation_prompt: bool) -> list[int]:
        if messages is not None:
            text = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], add_generation_prompt=add_generation_prompt)
            return self.tokenizer.encode(text, add_special_tokens)
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParamsError("prompt: must not be empty")
            return self.tokenizer.encode(prompt, add_special_tokens)
        assert prompt is not None
        if not prompt:
            raise InvalidParamsError("prompt: empty")
        return self._check_ids(prompt, "prompt")

    async def detokenize(self, token_ids: list[int]) -> str:
        self._check_ids(token_ids, "tokens")
        return await asyncio.to_thread(self.tokenizer.decode, token_ids, False)

    def _check_ids(self, ids: list[int], field: str) -> list[int]:
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidParamsError(f"{field}: token id {bad} is outside the vocabulary "
                                     f"(0..{vocab - 1})")
        return list(ids)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        tokens = await self.tokenize(request.prompt, request.messages,
                                     request.add_special_tokens, request.add_generation_prompt)
        flight = await self.server.submit(request.request_id, tokens, request.params,
                                          request.tenant)
        self._processor.add(request.request_id, flight.params)
        try:
            async for chunk in self._stream(request, tokens, flight):
                yield chunk
        finally:  # also when the client went away mid-stream: stop the work downstream
            self._processor.discard(request.request_id)
            await self.server.end_request(request.request_id)

    async def _stream(self, request: GenerateRequest, prompt: list[int],
                      flight: Flight) -> AsyncIterator[GenerateChunk]:
        generated: list[int] = []
        params = flight.params  # the first flight's: max_tokens set
        retries = 0
        cached = (0, 0)  # prompt tokens reused, those from the store
        start = time.monotonic()
        while True:
            try:
                output = await flight.next_output(self.server.config.request_timeout_s)
            except InstanceLostError:
                await self.server.end(flight)
                if not self._may_retry(params, generated, retries):
                    raise
                retries += 1
                flight = await self._resubmit(request, prompt, params, generated, retries)
                continue
            first = not generated
            if first:
                log.debug("request %s: first token after %.3f s", request.request_id,
                          time.monotonic() - start)
            # under P/D the prefill instance's word counts; a colocated instance says what it
            # reused with its first output or its last (vLLM)
            cached = flight.prefill_cached or (max(cached[0], output.num_cached_tokens),
                                               max(cached[1], output.num_store_tokens))
            generated += output.token_ids
            delta, _ = self._processor.process(_as_request(output, request.request_id))
            yield GenerateChunk(
                delta.text, output.token_ids, delta.finish_reason, len(prompt), cached[0],
                delta.stop_reason, self._logprobs(request, output),
                self._echo(request, prompt, output) if first and request.echo else None)
            if delta.finish_reason is not None:
                log.debug("request %s done in %.3fs", request.request_id,
                          time.monotonic() - start)
                self.server.metrics.count_cached(*cached)
                # a stream cut short here (a stop string) may end before the count came
                if flight.colocated and (output.finish_reason is not None or cached[0]):
                    self.server.check_hit(flight, cached[0])
                return

    def _may_retry(self, params: SamplingParams, generated: list[int], retries: int) -> bool:
        assert params.max_tokens is not None, "submit sets max_tokens"
        return (self.server.config.on_decode_failure == "retry" and retries < _MAX_RETRIES
                and len(generated) < params.max_tokens)

    async def _resubmit(self, request: GenerateRequest, prompt: list[int],
                        params: SamplingParams, generated: list[int], retries: int) -> Flight:
        assert params.max_tokens is not None, "submit sets max_tokens"
        rest = dataclasses.replace(params, max_tokens=params.max_tokens - len(generated),
                                   min_tokens=max(0, params.min_tokens - len(generated)),
                                   prompt_logprobs=None)
        log.warning("request %s: retrying after %d tokens", request.request_id, len(generated))
        return await self.server.submit(f"{request.request_id}-retry{retries}",
                                        prompt + generated, rest, request.tenant)

    # -- token ids spelt out -----------------------------------------------------------

    def _logprobs(self, request: GenerateRequest,
                  output: TokenOutput) -> tuple[TokenLogprob, ...] | None:
        if request.params.logprobs is None:
            return None
        tops = output.top_logprobs or [[] for _ in output.token_ids]
        return tuple(self._token_logprob(token_id, logprob, top) for token_id, logprob, top
                     in zip(output.token_ids, output.logprobs, tops, strict=True))

    def _echo(self, request: GenerateRequest, prompt: list[int],
              output: TokenOutput) -> EchoedPrompt:
        text = request.prompt if isinstance(request.prompt, str) else \
            self.tokenizer.decode(prompt, skip_special_tokens=False)
        if output.prompt_logprobs is None:
            return EchoedPrompt(text, prompt)
        tops = output.prompt_top_logprobs or [[] for _ in output.prompt_logprobs]
        scored = (self._token_logprob(token_id, logprob, top) for token_id, logprob, top
                  in zip(prompt[1:], output.prompt_logprobs, tops, strict=True))
        unscored = TokenLogprob(self._spell(prompt[0]), prompt[0], None)
        return EchoedPrompt(text, prompt, (unscored, *scored))

    def _token_logprob(self, token_id: int, logprob: float,
                       top: Sequence[tuple[int, float]]) -> TokenLogprob:
        alternatives = tuple(TokenLogprob(self._spell(i), i, lp) for i, lp in top)
        return TokenLogprob(self._spell(token_id), token_id, logprob, alternatives)

    def _spell(self, token_id: int) -> str:
        text = self._spellings.get(token_id)
        if text is None:
            text = self._spellings[token_id] = self.tokenizer.decode([token_id],
                                                                     skip_special_tokens=False)
        return text


def _as_request(output: TokenOutput, request_id: str) -> TokenOutput:
    """``output`` under the client's request id (a retried flight has its own)."""
    if output.request_id == request_id:
        return output
    return msgspec.structs.replace(output, request_id=request_id)
