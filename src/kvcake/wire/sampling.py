"""How a request samples and when it stops: :class:`SamplingParams`, plain data that every
channel carries (API → Conductor → instance), validated where it is built, torch-free. The
engine's sampler (:mod:`kvcake.engine.sampling`) reads it."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Annotated

import msgspec

from kvcake.common.errors import InvalidParamsError

MAX_LOGPROBS = 20
MAX_STOPS = 64  # stop strings of one request (also on the wire, checked while decoding)
MAX_STOP_TOKEN_IDS = 1024
MAX_STOP_CHARS = 256  # one stop string: a stream holds back its longest partial match
MAX_COUNT = (1 << 31) - 1  # token ids, top_k, token counts: what every engine encodes
GREEDY_BELOW = 1e-5  # temperatures this small are argmax; dividing by them overflows
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    ``max_tokens`` None: up to the model's context (resolved by :func:`fit_context`).
    ``temperature`` 0 is greedy; ``top_k`` 0 or -1 is off (-1 is stored as 0); ``top_p`` 1 and
    ``min_p`` 0 are off. ``stop`` may be given as a list or a single string; it is stored as a
    tuple (at most ``MAX_STOPS`` strings; ``stop_token_ids`` at most ``MAX_STOP_TOKEN_IDS``).
    ``logprobs`` is how many top alternatives to report per token (0: only the chosen
    token's log-probability; None: nothing); ``prompt_logprobs`` the same for every prompt
    token after the first (it turns prefix caching off for the request: cached tokens have no
    logits). Penalties are vLLM's (:mod:`kvcake.engine.penalties`): ``presence_penalty`` and
    ``frequency_penalty`` in [-2, 2] (0 off) over the output, ``repetition_penalty`` > 0 (1 off)
    over prompt and output. ``min_tokens``: EOS and ``stop_token_ids`` cannot end the request
    before that many tokens (nor can stop strings).
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: Annotated[tuple[str, ...], msgspec.Meta(max_length=MAX_STOPS)] = ()
    stop_token_ids: Annotated[tuple[int, ...], msgspec.Meta(max_length=MAX_STOP_TOKEN_IDS)] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0

    def __post_init__(self) -> None:
        self._normalise()
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1, high=MAX_COUNT)
        _check_float("temperature", self.temperature, 0.0, math.inf)
        _check_float("top_p", self.top_p, 0.0, 1.0, open_low=True)
        _check_int("top_k", self.top_k, low=0, high=MAX_COUNT,
                   what=f"0 or -1 (off), or 1..{MAX_COUNT}")
        _check_float("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=SEED_MIN, high=SEED_MAX)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=0, high=MAX_LOGPROBS)
        self._check_penalties()
        self._check_stops()

    def _check_penalties(self) -> None:
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, math.inf,
                     open_low=True)
        _check_int("min_tokens", self.min_tokens, low=0, high=MAX_COUNT)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParamsError(f"min_tokens must be at most max_tokens "
                                     f"({self.max_tokens}), got {self.min_tokens}")

    def _normalise(self) -> None:
        stop: object = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if isinstance(stop, list):
            stop = tuple(stop)
        object.__setattr__(self, "stop", stop)
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)

    def _check_stops(self) -> None:
        if not isinstance(self.stop, tuple):
            raise InvalidParamsError(f"stop must be a string or a list of strings, "
                                     f"got {self.stop!r}")
        for name, limit in (("stop", MAX_STOPS), ("stop_token_ids", MAX_STOP_TOKEN_IDS)):
            if len(getattr(self, name)) > limit:
                raise InvalidParamsError(f"{name} takes at most {limit} entries, got "
                                         f"{len(getattr(self, name))}")
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise InvalidParamsError(f"stop strings must be non-empty, got {text!r}")
            if len(text) > MAX_STOP_CHARS:
                raise InvalidParamsError(f"stop strings are at most {MAX_STOP_CHARS} "
                                         f"characters, got one of {len(text)}")
        if not isinstance(self.stop_token_ids, tuple):
            raise InvalidParamsError(f"stop_token_ids must be a list of token ids, "
                                     f"got {self.stop_token_ids!r}")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, low=0, high=MAX_COUNT)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        """Whether the sampler must look at the request's tokens (penalties, min_tokens)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.min_tokens
                    or self.repetition_penalty != 1.0)


def fit_context(params: SamplingParams, num_prompt_tokens: int,
                max_model_len: int) -> SamplingParams:
    """``params`` with ``max_tokens`` set (None: what the context leaves after the prompt).

    A prompt plus ``max_tokens`` longer than ``max_model_len`` raises InvalidParamsError in
    vLLM's words, so clients that parse them (and people) read the numbers.
    """
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise InvalidParamsError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {num_prompt_tokens} input tokens. Please reduce the length of the "
            f"input messages.")
    if params.max_tokens is None:
        return replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))
    if params.max_tokens > room:
        raise InvalidParamsError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + params.max_tokens} tokens ({num_prompt_tokens} in "
            f"the messages, {params.max_tokens} in the completion). Please reduce the length "
            f"of the messages or completion.")
    return params


def _check_int(name: str, value: object, low: int, high: int | None = None,
               what: str | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParamsError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = what or (f">= {low}" if high is None else f"in {low}..{high}")
        raise InvalidParamsError(f"{name} must be {bounds}, got {value}")


def _check_float(name: str, value: object, low: float, high: float,
                 open_low: bool = False) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidParamsError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if open_low else value < low
    if not math.isfinite(value) or too_low or value > high:
        bounds = f"in {'(' if open_low else '['}{low}, {high}]"
        if high == math.inf:
            bounds = f"finite and {'>' if open_low else '>='} {low}"
        raise InvalidParamsError(f"{name} must be {bounds}, got {value}")
