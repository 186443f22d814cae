"""OpenAI's (and vLLM's) request bodies, as pydantic models: validation lives at this edge.

Requests validate into :class:`CompletionRequest` / :class:`ChatCompletionRequest`, which map
onto the engine's :class:`SamplingParams`. Unknown fields are ignored (the OpenAI SDK sends
some); fields that would change the answer but that kvcake does not implement
(``response_format`` other than text, ``tools``, ``logit_bias``, ``suffix``, guided decoding,
``best_of``) are refused with a message naming the field, never silently dropped. Response
bodies live in :mod:`kvcake.api.responses`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from kvcake.wire.sampling import MAX_LOGPROBS, SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
MAX_CHOICES = 16  # ``n``: each choice is a request of its own in the cluster
MAX_COMPLETIONS = 64  # prompts x n in one /v1/completions request
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
           "structured_outputs")


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
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    response_format: Any = None
    logit_bias: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None

    @field_validator(*_GUIDED)
    @classmethod
    def _no_guided_decoding(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("guided decoding is not supported; send null")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else value
        if value is not None and kind != "text":
            raise ValueError(f"only the text response format is supported (structured output "
                             f"is not), got {kind!r}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _options_need_a_stream(cls, value: StreamOptions | None,
                               info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only for a stream: set stream to true or send "
                             "null")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: Any) -> Any:
        if value:
            raise ValueError("logit_bias is not supported; send null or {}")
        return value

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

    @property
    def num_choices(self) -> int:
        return self.n or 1

    def sampling_params(self, max_tokens: int | None, logprobs: int | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's parameters; fields left out or null keep the engine's defaults.

        ``max_tokens`` None: up to the model's context. Raises InvalidParamsError for values
        the engine refuses (e.g. a negative temperature).
        """
        given: dict[str, Any] = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "seed": self.seed, "stop": self.stop,
            "stop_token_ids": self.stop_token_ids, "ignore_eos": self.ignore_eos,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens, "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty, "min_tokens": self.min_tokens,
        }
        chosen = {name: value for name, value in given.items() if value is not None}
        return SamplingParams(max_tokens=max_tokens, **chosen)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions: a prompt as text or token ids, or a batch of them (each prompt
    gets ``n`` choices, indexed prompt by prompt)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    add_special_tokens: bool = True  # a text prompt gets the tokenizer's BOS, as in vLLM
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, prompt: object, info: ValidationInfo) -> object:
        """Check each prompt; unwrap a batch of one; bound prompts x n."""
        if not (isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list)):
            _check_prompt(prompt)
            return prompt
        for one in prompt:
            _check_prompt(one)
        total = len(prompt) * (info.data.get("n") or 1)
        if total > MAX_COMPLETIONS:
            raise ValueError(f"at most {MAX_COMPLETIONS} completions per request (prompts x "
                             f"n), got {total}")
        return prompt[0] if len(prompt) == 1 else prompt

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts of the batch (one for a single prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str) or not isinstance(prompt[0], str | list):
            return [prompt]
        return list(prompt)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix (insertion) is not supported; send null")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError(f"best_of is not supported (use n); send null or 1, got {best_of}")
        return best_of

    @property
    def max_new_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS

    def params(self) -> SamplingParams:
        """With ``echo`` and ``logprobs`` the prompt's tokens are scored too."""
        prompt_logprobs = self.logprobs if self.echo else None
        return self.sampling_params(self.max_new_tokens, self.logprobs, prompt_logprobs)


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
    """POST /v1/chat/completions; without a token limit it may fill the model's context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the chat template writes its own BOS
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    echo: bool | None = False

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, tools: list[Any] | None) -> list[Any] | None:
        if tools:
            raise ValueError("tool calling is not supported; send no tools")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, choice: Any) -> Any:
        if choice not in (None, "none", "auto"):
            raise ValueError(f"tool calling is not supported; got tool_choice {choice!r}")
        return choice

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool | None) -> bool | None:
        if echo:
            raise ValueError("echo is supported by /v1/completions only; send false")
        return echo

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("needs logprobs set to true")
        return top

    @property
    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens``, else the deprecated ``max_tokens``, else None (up to
        the model's context, as vLLM does)."""
        for limit in (self.max_completion_tokens, self.max_tokens):
            if limit is not None:
                return limit
        return None

    def params(self) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(self.max_new_tokens, logprobs)

    def message_dicts(self) -> tuple[dict[str, str], ...]:
        return tuple({"role": m.role, "content": m.content} for m in self.messages)


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's): a prompt or chat messages, tokenized as the completion or
    chat endpoint would (``add_special_tokens`` defaults as there)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, validate_default=True)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True

    @property
    def special_tokens(self) -> bool:
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.messages is None

    @field_validator("messages")
    @classmethod
    def _one_input(cls, messages: list[ChatMessage] | None,
                   info: ValidationInfo) -> list[ChatMessage] | None:
        if (info.data.get("prompt") is None) == (messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return messages


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]

    @field_validator("tokens")
    @classmethod
    def _token_ids(cls, tokens: list[int]) -> list[int]:
        if not all(_is_token_id(token) for token in tokens):
            raise ValueError("token ids must be non-negative integers")
        return tokens


def _check_prompt(prompt: object) -> None:
    if isinstance(prompt, str | list) and not prompt:
        raise ValueError("must not be empty")
    if isinstance(prompt, list) and not all(_is_token_id(token) for token in prompt):
        raise ValueError("token ids must be non-negative integers")
    if not isinstance(prompt, str | list):
        raise ValueError(f"must be a string or a list of token ids, got {prompt!r}")


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
