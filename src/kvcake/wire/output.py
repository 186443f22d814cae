"""The one output record: what a step produced for one request, from the engine that drew
the tokens, over the instance's RPC, to the client edge that turns it into text.

Every list is bounded, checked while a record is decoded: token ids, log-probabilities and
their top lists ``MAX_TOKENS`` (a context's worth), each top list ``MAX_TOP_LOGPROBS``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

MAX_TOKENS = 1 << 20
MAX_TOP_LOGPROBS = 64
TopLogprobs = Annotated[list[tuple[int, float]], msgspec.Meta(max_length=MAX_TOP_LOGPROBS)]
TopPerToken = Annotated[list[TopLogprobs], msgspec.Meta(max_length=MAX_TOKENS)]
Floats = Annotated[list[float], msgspec.Meta(max_length=MAX_TOKENS)]
Tokens = Annotated[list[int], msgspec.Meta(max_length=MAX_TOKENS)]


class TokenOutput(msgspec.Struct, frozen=True, array_like=True):
    """New tokens of one request.

    token_ids: drawn this step (empty for a chunk that did not sample).
    logprobs / top_logprobs: their log-probabilities and top alternatives, ``(token id,
        logprob)`` most likely first (empty unless the request asked for ``logprobs``).
    finish_reason: ``stop``, ``length`` or ``abort`` once finished, else ``None``.
    num_cached_tokens: prompt tokens whose KV was reused (local cache or store).
    num_store_tokens: the part of those loaded from the store.
    prompt_logprobs / prompt_top_logprobs: scores of prompt tokens 1..n-1, on the output
        with the first token of a request that asked for ``prompt_logprobs`` (else None).
    first_token_s: seconds from arrival to the first token, on the engine's clock.
    """

    request_id: str
    token_ids: Tokens
    logprobs: Floats
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_store_tokens: int
    top_logprobs: TopPerToken = []
    prompt_logprobs: Floats | None = None
    prompt_top_logprobs: TopPerToken | None = None
    first_token_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
