"""SamplingParams: validation that names the field, normalised lists, and fitting a request
into the model's context in vLLM's words."""

from __future__ import annotations

import math
from typing import Any

import pytest

from kvcake.common.errors import InvalidParamsError
from kvcake.wire.sampling import SamplingParams, fit_context


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", 0), ("max_tokens", 1.5), ("temperature", -0.1),
    ("temperature", math.nan), ("temperature", math.inf), ("top_p", 0.0), ("top_p", 1.01),
    ("top_k", -2),
    ("min_p", 1.5), ("logprobs", 21), ("logprobs", -1), ("seed", 1 << 64),
    ("stop", [""]), ("stop", [3]), ("stop_token_ids", [-1]), ("max_tokens", True),
    # past what the wire encodes (the Conductor would fail to send the request) or what a
    # stream can check cheaply at every step
    ("top_k", 10**20), ("stop_token_ids", [1 << 64]), ("min_tokens", 1 << 40),
    ("max_tokens", 1 << 40), ("stop", ["x" * 257]),
])
def test_invalid_params_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(InvalidParamsError, match=field):
        SamplingParams(**{field: value})


def test_params_normalise_lists_and_top_k_off() -> None:
    params = SamplingParams(stop=["a", "bc"], stop_token_ids=[2, 3], top_k=-1)  # type: ignore[arg-type]
    assert params.stop == ("a", "bc")
    assert params.stop_token_ids == (2, 3)
    assert params.top_k == 0
    assert SamplingParams(stop="x").stop == ("x",)  # type: ignore[arg-type]
    assert hash(params) == hash(SamplingParams(stop=("a", "bc"), stop_token_ids=(2, 3)))


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.5).greedy


@pytest.mark.parametrize(("field", "value"), [
    ("presence_penalty", 2.5), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
    ("min_tokens", -1), ("prompt_logprobs", 21),
])
def test_invalid_penalties_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(InvalidParamsError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_may_not_exceed_max_tokens() -> None:
    with pytest.raises(InvalidParamsError, match="min_tokens must be at most max_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)


def test_fit_context_fills_or_refuses_in_vllms_words() -> None:
    assert fit_context(SamplingParams(max_tokens=None), 10, 2048).max_tokens == 2038
    assert fit_context(SamplingParams(max_tokens=5), 10, 2048).max_tokens == 5
    with pytest.raises(InvalidParamsError) as caught:
        fit_context(SamplingParams(max_tokens=100000), 1, 2048)
    assert caught.value.args[0] == (
        "This model's maximum context length is 2048 tokens. However, you requested 100001 "
        "tokens (1 in the messages, 100000 in the completion). Please reduce the length of "
        "the messages or completion.")
    with pytest.raises(InvalidParamsError, match="your request has 2048 input tokens"):
        fit_context(SamplingParams(max_tokens=None), 2048, 2048)
