"""A flight's token gaps, as the Conductor measures TBT for the cost model."""

from __future__ import annotations

import asyncio

import pytest

from kvcake.conductor.flight import Flight, FlightState
from kvcake.wire.output import TokenOutput
from kvcake.wire.sampling import SamplingParams


def output(num_tokens: int, finish: str | None = None) -> TokenOutput:
    return TokenOutput("r", list(range(num_tokens)), [0.0] * num_tokens, finish, 5, 0, 0)


def test_gaps_exclude_the_first_token_and_split_batched_outputs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> Flight:
        flight = Flight("r", [1, 2, 3], SamplingParams(), "default", "p", "d")
        for now, tokens, finish in ((10.0, 1, None), (10.1, 1, None), (10.4, 3, None),
                                    (10.6, 1, "length")):
            monkeypatch.setattr("kvcake.conductor.flight.time.monotonic", lambda n=now: n)
            flight.push(output(tokens, finish))
        return flight

    flight = asyncio.run(scenario())
    assert flight.state is FlightState.FINISHED
    assert flight.token_gaps() == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.2])
    assert flight.num_output_tokens == 6


def test_a_decode_seat_is_held_twice_the_predicted_ttft_within_the_bound() -> None:
    from kvcake.conductor.server import _hold_s
    from kvcake.wire.worker import MAX_HOLD_S
    assert _hold_s(12.5) == 25.0
    assert _hold_s(0.0) == 0.0
    assert _hold_s(float("inf")) == MAX_HOLD_S
    assert _hold_s(float("nan")) == 0.0
    assert _hold_s(-1.0) == 0.0
