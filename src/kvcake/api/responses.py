"""OpenAI's response bodies, and one formatter per endpoint that builds them for a request.

A request with ``n`` choices runs ``n`` generations; a formatter turns their chunks into
bodies (all choices at once) or stream events (one choice's chunk at a time, tagged with its
index). Log-probabilities come in each endpoint's own shape::

    completions  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{tok: lp}],
                  "text_offset": [...]}      echo: the prompt's entries first, the first null
    chat         {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer

from kvcake.wire.generate import GenerateChunk, TokenLogprob

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; what vLLM sends in its place


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, chunks: Sequence[GenerateChunk], choices_per_prompt: int,
           num_generated: int) -> Usage:
        """Usage with ``num_generated`` tokens so far over every choice; ``chunks`` holds a
        chunk of each choice, ``choices_per_prompt`` consecutive ones per prompt (each prompt
        counts once)."""
        firsts = chunks[::choices_per_prompt]
        prompt_tokens = sum(c.num_prompt_tokens for c in firsts)
        return cls(prompt_tokens=prompt_tokens, completion_tokens=num_generated,
                   total_tokens=prompt_tokens + num_generated,
                   prompt_tokens_details=PromptTokensDetails(
                       cached_tokens=sum(c.num_cached_tokens for c in firsts)))


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
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


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ----- one formatter per endpoint
@dataclass
class CompletionFormatter:
    """Builds /v1/completions bodies for one request.

    Stream events are JSON text; chunks carry ``usage`` (null) only when the client asked for
    a usage chunk, as OpenAI does. ``text_offset`` runs on across a choice's events. With
    ``echo`` the prompt (and its scores) come first.
    """

    request_id: str
    model: str
    created: int
    include_usage: bool = False
    choices_per_prompt: int = 1
    echo: bool = False
    _offsets: dict[int, int] = field(default_factory=dict)

    def opening(self, num_choices: int) -> list[str]:
        """Events sent before the first chunk: none for completions."""
        return []

    def chunk(self, index: int, chunk: GenerateChunk) -> str:
        choice = self._choice(index, [chunk], self._offsets.get(index, 0))
        if choice.logprobs is not None and choice.logprobs.tokens:
            last = choice.logprobs.text_offset[-1] + len(choice.logprobs.tokens[-1])
            self._offsets[index] = last
        return self._event([choice])

    def usage_chunk(self, usage: Usage) -> str:
        return Completion(id=self.request_id, created=self.created, model=self.model,
                          choices=[], usage=usage).model_dump_json()

    def response(self, choices: Sequence[Sequence[GenerateChunk]]) -> dict[str, Any]:
        built = [self._choice(index, chunks, 0) for index, chunks in enumerate(choices)]
        return Completion(id=self.request_id, created=self.created, model=self.model,
                          choices=built,
                          usage=_usage(choices, self.choices_per_prompt)).model_dump()

    def _choice(self, index: int, chunks: Sequence[GenerateChunk],
                offset: int) -> CompletionChoice:
        prompt = chunks[0].prompt if self.echo else None
        text = (prompt.text if prompt else "") + "".join(c.text for c in chunks)
        entries = list(prompt.logprobs or ()) if prompt else []
        asked = any(c.logprobs is not None for c in chunks)
        for chunk in chunks:
            entries += chunk.logprobs or ()
        logprobs = _completion_logprobs(entries, offset) if asked else None
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=chunks[-1].finish_reason,
                                stop_reason=chunks[-1].stop_reason)

    def _event(self, choices: list[CompletionChoice]) -> str:
        body = Completion(id=self.request_id, created=self.created, model=self.model,
                          choices=choices)
        return body.model_dump_json(exclude=None if self.include_usage else {"usage"})


@dataclass
class ChatFormatter:
    """Builds /v1/chat/completions bodies for one request; streams open with the role."""

    request_id: str
    model: str
    created: int
    include_usage: bool = False
    choices_per_prompt: int = 1

    def opening(self, num_choices: int) -> list[str]:
        return [self._event(ChatChunkChoice(index=index, delta=Delta(role="assistant",
                                                                     content="")))
                for index in range(num_choices)]

    def chunk(self, index: int, chunk: GenerateChunk) -> str:
        logprobs = None if chunk.logprobs is None else _chat_logprobs(chunk.logprobs)
        return self._event(ChatChunkChoice(index=index, delta=Delta(content=chunk.text),
                                           logprobs=logprobs, finish_reason=chunk.finish_reason,
                                           stop_reason=chunk.stop_reason))

    def usage_chunk(self, usage: Usage) -> str:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                   choices=[], usage=usage).model_dump_json()

    def response(self, choices: Sequence[Sequence[GenerateChunk]]) -> dict[str, Any]:
        built = [self._choice(index, chunks) for index, chunks in enumerate(choices)]
        return ChatCompletion(id=self.request_id, created=self.created, model=self.model,
                              choices=built,
                              usage=_usage(choices, self.choices_per_prompt)).model_dump()

    def _choice(self, index: int, chunks: Sequence[GenerateChunk]) -> ChatChoice:
        message = AssistantMessage(content="".join(c.text for c in chunks))
        logprobs = None
        if any(c.logprobs is not None for c in chunks):
            logprobs = _chat_logprobs([e for c in chunks for e in c.logprobs or ()])
        return ChatChoice(index=index, message=message, logprobs=logprobs,
                          finish_reason=chunks[-1].finish_reason,
                          stop_reason=chunks[-1].stop_reason)

    def _event(self, choice: ChatChunkChoice) -> str:
        body = ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                   choices=[choice])
        return body.model_dump_json(exclude=None if self.include_usage else {"usage"})


Formatter = CompletionFormatter | ChatFormatter


def _usage(choices: Sequence[Sequence[GenerateChunk]], choices_per_prompt: int) -> Usage:
    return Usage.of([chunks[-1] for chunks in choices], choices_per_prompt,
                    sum(len(c.token_ids) for chunks in choices for c in chunks))


def _completion_logprobs(entries: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
    """The legacy shape; ``top_logprobs`` also holds the chosen token (as vLLM's does)."""
    logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[],
                                  text_offset=[])
    for entry in entries:
        logprobs.tokens.append(entry.token)
        logprobs.text_offset.append(offset)
        offset += len(entry.token)
        if entry.logprob is None:  # the prompt's first token: nothing predicts it
            logprobs.token_logprobs.append(None)
            logprobs.top_logprobs.append(None)
            continue
        logprobs.token_logprobs.append(_finite(entry.logprob))
        top = {alt.token: _finite(alt.logprob) for alt in entry.top}
        top.setdefault(entry.token, _finite(entry.logprob))
        logprobs.top_logprobs.append(top)
    return logprobs


def _chat_logprobs(entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=e.token, logprob=_finite(e.logprob), bytes=list(e.token.encode()),
                         top_logprobs=[ChatTopLogprob(token=t.token, logprob=_finite(t.logprob),
                                                      bytes=list(t.token.encode()))
                                       for t in e.top])
        for e in entries])


def _finite(logprob: float | None) -> float:
    assert logprob is not None, "only the prompt's first token has no log-probability"
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR
