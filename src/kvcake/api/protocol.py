"""OpenAI's request and response bodies, as pydantic models: validation lives at this edge.

Requests validate into :class:`CompletionRequest` / :class:`ChatCompletionRequest`, which map
onto the engine's :class:`SamplingParams`. Unknown fields are ignored (the OpenAI SDK sends
some); fields kvcake cannot honour (``n`` > 1, penalties, log-probabilities, ``echo``) are
refused with a message naming the field rather than silently dropped. Responses are built by
a per-request formatter, one for each endpoint, with the same four methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from kvcake.api.backend import GenerateChunk
from kvcake.engine.sampling import SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512  # chat has no fixed default upstream; a full answer fits in this


# ----- requests
class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _SamplingFields(BaseModel):
    """Fields both endpoints share; OpenAI's, then vLLM's extensions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError(f"only n=1 is supported (one choice per request), got {n}")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, penalty: float | None) -> float | None:
        if penalty not in (None, 0):
            raise ValueError(f"penalties are not supported; send 0, got {penalty}")
        return penalty

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, stop: object) -> object:
        if stop is None or isinstance(stop, str):
            return stop
        if isinstance(stop, list) and all(isinstance(text, str) for text in stop):
            return stop
        raise ValueError(f"must be a string or a list of strings, got {stop!r}")

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's parameters; fields left out or null keep the engine's defaults.

        Raises InvalidParamsError for values the engine refuses (e.g. a negative temperature).
        """
        given: dict[str, Any] = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "seed": self.seed, "stop": self.stop,
            "stop_token_ids": self.stop_token_ids, "ignore_eos": self.ignore_eos,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
        }
        chosen = {name: value for name, value in given.items() if value is not None}
        return SamplingParams(max_tokens=max_tokens, **chosen)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions: one prompt, as text or token ids."""

    prompt: str | list[int]
    echo: bool | None = False
    logprobs: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: object) -> object:
        """Unwrap a one-element batch; refuse real batches and empty prompts."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) > 1:
                raise ValueError(f"batch prompts are not supported: send one prompt per "
                                 f"request (got {len(prompt)})")
            prompt = prompt[0]
        if isinstance(prompt, str | list) and not prompt:
            raise ValueError("must not be empty")
        if isinstance(prompt, list) and not all(_is_token_id(token) for token in prompt):
            raise ValueError("token ids must be non-negative integers")
        if not isinstance(prompt, str | list):
            raise ValueError(f"must be a string or a list of token ids, got {prompt!r}")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool | None) -> bool | None:
        if echo:
            raise ValueError("echoing the prompt is not supported; send false")
        return echo

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: int | None) -> int | None:
        if logprobs not in (None, 0):
            raise ValueError(f"log-probabilities are not supported; send null or 0, "
                             f"got {logprobs}")
        return logprobs

    @property
    def max_new_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS


class ChatMessage(BaseModel):
    """One chat turn; ``content`` arrives as text or text parts and is kept as text."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _flatten(cls, content: object) -> object:
        """Join OpenAI content parts (``{"type": "text", "text": ...}``) with newlines."""
        if content is None:
            return ""  # an assistant turn that only called tools has no text
        if not isinstance(content, list):
            return content
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"only text content parts are supported, got {kind!r}")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string 'text'")
            texts.append(part["text"])
        return "\n".join(texts)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> bool | int | None:
        if value:
            raise ValueError(f"log-probabilities are not supported; send null, false or 0, "
                             f"got {value}")
        return value

    @property
    def max_new_tokens(self) -> int:
        """``max_completion_tokens``, else the deprecated ``max_tokens``, else the default."""
        for limit in (self.max_completion_tokens, self.max_tokens):
            if limit is not None:
                return limit
        return DEFAULT_CHAT_MAX_TOKENS

    def message_dicts(self) -> tuple[dict[str, str], ...]:
        return tuple({"role": m.role, "content": m.content} for m in self.messages)


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ----- responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, last: GenerateChunk, num_generated: int) -> Usage:
        """Usage after ``last``, the latest chunk, with ``num_generated`` tokens so far."""
        return cls(prompt_tokens=last.num_prompt_tokens, completion_tokens=num_generated,
                   total_tokens=last.num_prompt_tokens + num_generated,
                   prompt_tokens_details=PromptTokensDetails(
                       cached_tokens=last.num_cached_tokens))


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None
    stop_reason: str | int | None = None


class Completion(BaseModel):
    """A whole completion, or one chunk of a stream (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None
    stop_reason: str | int | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    """What a chat chunk adds; fields that are None are left out of the JSON."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvcake"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ----- one formatter per endpoint
@dataclass(frozen=True)
class CompletionFormatter:
    """Builds /v1/completions bodies for one request.

    Stream events are JSON text; chunks carry ``usage`` (null) only when the client asked for
    a usage chunk, as OpenAI does.
    """

    request_id: str
    model: str
    created: int
    include_usage: bool = False

    def opening(self) -> list[str]:
        """Events sent before the first chunk: none for completions."""
        return []

    def chunk(self, chunk: GenerateChunk) -> str:
        choice = CompletionChoice(text=chunk.text, finish_reason=chunk.finish_reason,
                                  stop_reason=chunk.stop_reason)
        return self._event([choice])

    def usage_chunk(self, usage: Usage) -> str:
        return Completion(id=self.request_id, created=self.created, model=self.model,
                          choices=[], usage=usage).model_dump_json()

    def response(self, chunks: Sequence[GenerateChunk]) -> dict[str, Any]:
        last = chunks[-1]
        choice = CompletionChoice(text="".join(c.text for c in chunks),
                                  finish_reason=last.finish_reason, stop_reason=last.stop_reason)
        return Completion(id=self.request_id, created=self.created, model=self.model,
                          choices=[choice], usage=_usage(chunks)).model_dump()

    def _event(self, choices: list[CompletionChoice]) -> str:
        body = Completion(id=self.request_id, created=self.created, model=self.model,
                          choices=choices)
        return body.model_dump_json(exclude=None if self.include_usage else {"usage"})


@dataclass(frozen=True)
class ChatFormatter:
    """Builds /v1/chat/completions bodies for one request; streams open with the role."""

    request_id: str
    model: str
    created: int
    include_usage: bool = False

    def opening(self) -> list[str]:
        return [self._event(ChatChunkChoice(delta=Delta(role="assistant", content="")))]

    def chunk(self, chunk: GenerateChunk) -> str:
        return self._event(ChatChunkChoice(delta=Delta(content=chunk.text),
                                           finish_reason=chunk.finish_reason,
                                           stop_reason=chunk.stop_reason))

    def usage_chunk(self, usage: Usage) -> str:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                   choices=[], usage=usage).model_dump_json()

    def response(self, chunks: Sequence[GenerateChunk]) -> dict[str, Any]:
        last = chunks[-1]
        message = AssistantMessage(content="".join(c.text for c in chunks))
        choice = ChatChoice(message=message, finish_reason=last.finish_reason,
                            stop_reason=last.stop_reason)
        return ChatCompletion(id=self.request_id, created=self.created, model=self.model,
                              choices=[choice], usage=_usage(chunks)).model_dump()

    def _event(self, choice: ChatChunkChoice) -> str:
        body = ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                   choices=[choice])
        return body.model_dump_json(exclude=None if self.include_usage else {"usage"})


Formatter = CompletionFormatter | ChatFormatter


def _usage(chunks: Sequence[GenerateChunk]) -> Usage:
    return Usage.of(chunks[-1], sum(len(c.token_ids) for c in chunks))
