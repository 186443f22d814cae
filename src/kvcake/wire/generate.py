"""The client edge's channel: a validated generation request and the chunks that answer it.

The HTTP front end builds a :class:`GenerateRequest` from an OpenAI request and turns each
:class:`GenerateChunk` back into a response (:mod:`kvcake.api`); whatever implements
:class:`kvcake.api.backend.Backend` (the Conductor) consumes and produces them.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcake.common.errors import InvalidParamsError
from kvcake.wire.sampling import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    """One validated generation request; exactly one of ``prompt`` and ``messages`` is set.

    request_id: ``cmpl-<uuid hex>`` for completions, ``chatcmpl-<uuid hex>`` for chat.
    prompt: /v1/completions' text or token ids.
    messages: /v1/chat/completions' ``{"role", "content"}`` dicts, content flattened to text.
    params: ``max_tokens`` None asks for what the context leaves after the prompt;
        ``logprobs`` / ``prompt_logprobs`` ask for the chunks' ``logprobs`` / ``prompt``.
    add_generation_prompt: chat only; end the rendered prompt with the assistant's turn.
    add_special_tokens: text is tokenized with the tokenizer's BOS/EOS where it adds them.
    echo: the first chunk carries the prompt (``GenerateChunk.prompt``).
    """

    request_id: str
    prompt: str | list[int] | None
    messages: tuple[dict[str, str], ...] | None
    params: SamplingParams
    tenant: str = "default"
    add_generation_prompt: bool = True
    echo: bool = False
    add_special_tokens: bool = False

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
