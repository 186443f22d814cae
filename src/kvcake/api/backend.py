"""The contract between the HTTP front end and whatever generates tokens behind it.

The front end validates an OpenAI request, turns it into a :class:`GenerateRequest` and
iterates :meth:`Backend.generate`; the Conductor implements :class:`Backend` in production and
tests implement it with scripted chunks. Nothing here knows about HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kvcake.common.errors import InvalidParamsError
from kvcake.engine.sampling import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    """One validated generation request; exactly one of ``prompt`` and ``messages`` is set.

    request_id: ``cmpl-<uuid hex>`` for completions, ``chatcmpl-<uuid hex>`` for chat.
    prompt: /v1/completions' text or token ids.
    messages: /v1/chat/completions' ``{"role", "content"}`` dicts, content flattened to text.
    params: ``max_tokens`` None asks for what the context leaves after the prompt;
        ``logprobs`` / ``prompt_logprobs`` ask for the chunks' ``logprobs`` / ``prompt``.
    add_generation_prompt: chat only; end the rendered prompt with the assistant's turn.
    echo: the first chunk carries the prompt (``GenerateChunk.prompt``).
    """

    request_id: str
    prompt: str | list[int] | None
    messages: tuple[dict[str, str], ...] | None
    params: SamplingParams
    tenant: str = "default"
    add_generation_prompt: bool = True
    echo: bool = False

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidParamsError(f"request {self.request_id} needs exactly one of prompt "
                                     f"and messages")


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability; ``top`` the most likely alternatives, best first.

    ``token`` is the token's own text (special tokens spelt out); ``logprob`` is None only
    for the prompt's first token (nothing predicts it).
    """

    token: str
    token_id: int
    logprob: float | None
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class EchoedPrompt:
    """The prompt as the first chunk carries it back (``echo``).

    logprobs: one per prompt token (the first with logprob None); None unless the request
        asked for ``prompt_logprobs``.
    """

    text: str
    token_ids: list[int]
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class GenerateChunk:
    """What one step added to a request's output.

    text: new text since the last chunk (may be "", e.g. while a stop string is held back).
    token_ids: new token ids.
    finish_reason: "stop" | "length" | "abort" on the last chunk, else None.
    num_prompt_tokens: the prompt's length in tokens.
    num_cached_tokens: prompt tokens whose KV was reused rather than computed.
    stop_reason: the stop string or stop token id that ended the request, if one did.
    logprobs: one per token of ``token_ids`` when the request asked for ``logprobs``.
    prompt: on the first chunk of a request that asked for ``echo``.
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    stop_reason: str | int | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt: EchoedPrompt | None = None


@runtime_checkable
class Backend(Protocol):
    """Generates tokens for the front end (the Conductor in production)."""

    @property
    def model_name(self) -> str:
        """The one model served; requests naming another get 404."""
        ...

    @property
    def max_model_len(self) -> int:
        """The longest prompt plus completion served, in tokens (0: not known yet)."""
        ...

    async def tokenize(self, prompt: str | list[int] | None,
                       messages: tuple[dict[str, str], ...] | None,
                       add_special_tokens: bool, add_generation_prompt: bool) -> list[int]:
        """Token ids of a prompt or of chat messages (exactly one is given), off the event
        loop. Raises InvalidParamsError for a bad prompt (e.g. ids outside the vocabulary)."""
        ...

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``; ids outside the vocabulary raise InvalidParamsError."""
        ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Yields chunks until one has a ``finish_reason``.

        Raises RequestRejectedError (→ 429), InvalidParamsError (→ 400), or another
        KvcakeError (→ its status hint, e.g. 503 when no instance can serve). If the consumer
        stops iterating (``aclose`` or cancellation) before that last chunk, the backend aborts
        the request downstream. The consumer closes the iterator after the last chunk too,
        rather than exhausting it: that is not an abort.
        """
        ...

    def health(self) -> tuple[bool, dict[str, object]]:
        """(ready, details): /health answers 200 when ready, else 503, with the details."""
        ...

    def render_metrics(self) -> str:
        """Extra Prometheus text appended to /metrics ("" for none)."""
        ...
