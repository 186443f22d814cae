"""The Conductor as the API's :class:`~kvcake.api.Backend`: text in, routed tokens, text out.

Tokenizing (and the chat template), detokenizing and stop strings happen here, once, so the
instances see token ids only. With ``on_decode_failure="retry"`` a request whose instance
died is routed again as a continuation: the prompt plus every token already streamed, for
the tokens still owed, and the client's stream simply goes on.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from kvcake.api.backend import GenerateChunk, GenerateRequest
from kvcake.common.errors import InvalidParamsError
from kvcake.common.log import get_logger
from kvcake.conductor.flight import Flight, InstanceLostError
from kvcake.conductor.messages import TokenOutput
from kvcake.conductor.server import ConductorServer
from kvcake.engine.core import RequestOutput
from kvcake.engine.output import OutputProcessor
from kvcake.engine.sampling import SamplingParams
from kvcake.engine.tokenizer import Tokenizer

log = get_logger(__name__)
_MAX_RETRIES = 2


class ConductorBackend:
    def __init__(self, server: ConductorServer, tokenizer: Tokenizer, model_name: str) -> None:
        self.server = server
        self.tokenizer = tokenizer
        self._model_name = model_name
        self._processor = OutputProcessor(tokenizer)

    @property
    def model_name(self) -> str:
        return self._model_name

    def health(self) -> tuple[bool, dict[str, object]]:
        return self.server.health()

    def render_metrics(self) -> str:
        return self.server.render_metrics()

    def tokenize(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            text = self.tokenizer.apply_chat_template(
                [dict(m) for m in request.messages],
                add_generation_prompt=request.add_generation_prompt)
            return self.tokenizer.encode(text)
        if isinstance(request.prompt, str):
            if not request.prompt:
                raise InvalidParamsError("prompt: must not be empty")
            return self.tokenizer.encode(request.prompt)
        assert request.prompt is not None
        return self._check_ids(request.prompt)

    def _check_ids(self, ids: list[int]) -> list[int]:
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if not ids or bad is not None:
            raise InvalidParamsError(f"prompt: token id {bad} is outside the vocabulary "
                                     f"(0..{vocab - 1})" if ids else "prompt: empty")
        return list(ids)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        tokens = self.tokenize(request)
        flight = await self.server.submit(request.request_id, tokens, request.params,
                                          request.tenant)
        self._processor.add(request.request_id, request.params)
        try:
            async for chunk in self._stream(request, tokens, flight):
                yield chunk
        finally:  # also when the client went away mid-stream: stop the work downstream
            self._processor.discard(request.request_id)
            await self.server.end_request(request.request_id)

    async def _stream(self, request: GenerateRequest, prompt: list[int],
                      flight: Flight) -> AsyncIterator[GenerateChunk]:
        generated: list[int] = []
        retries = 0
        num_cached = 0
        start = time.monotonic()
        while True:
            try:
                output = await flight.next_output(self.server.config.request_timeout_s)
            except InstanceLostError:
                await self.server.end(flight)
                if not self._may_retry(request, generated, retries):
                    raise
                retries += 1
                flight = await self._resubmit(request, prompt, generated, retries)
                continue
            if not generated:
                log.debug("request %s: first token after %.3f s", request.request_id,
                          time.monotonic() - start)
                num_cached = output.num_cached_tokens
                self.server.metrics.count_cached(output.num_cached_tokens,
                                                 output.num_store_tokens)
            generated += output.token_ids
            delta, _ = self._processor.process(_as_engine_output(
                request.request_id, output, len(prompt), num_cached))
            yield GenerateChunk(delta.text, output.token_ids, delta.finish_reason, len(prompt),
                                num_cached, delta.stop_reason)
            if delta.finish_reason is not None:
                log.debug("request %s done in %.3fs", request.request_id,
                          time.monotonic() - start)
                return

    def _may_retry(self, request: GenerateRequest, generated: list[int], retries: int) -> bool:
        return (self.server.config.on_decode_failure == "retry" and retries < _MAX_RETRIES
                and len(generated) < request.params.max_tokens)

    async def _resubmit(self, request: GenerateRequest, prompt: list[int], generated: list[int],
                  retries: int) -> Flight:
        params: SamplingParams = dataclasses.replace(
            request.params, max_tokens=request.params.max_tokens - len(generated))
        log.warning("request %s: retrying after %d tokens", request.request_id, len(generated))
        return await self.server.submit(f"{request.request_id}-retry{retries}",
                                        prompt + generated, params, request.tenant)


def _as_engine_output(request_id: str, output: TokenOutput, num_prompt_tokens: int,
                      num_cached: int) -> RequestOutput:
    return RequestOutput(request_id, output.token_ids, output.logprobs, output.finish_reason,
                         num_prompt_tokens, num_cached, output.num_store_tokens, None)
