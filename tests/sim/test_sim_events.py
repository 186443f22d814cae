"""The event heap: (time, kind, sequence) order, refused times, ``run(until=)``, counting."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from kvcake.common.errors import InvalidParamsError
from kvcake.sim.events import EventKind, EventQueue


def recorder(queue: EventQueue, log: list[tuple[float, str]], name: str) -> Callable[[], None]:
    """An action that notes the clock and its own name when it runs."""
    return lambda: log.append((queue.now, name))


def test_earlier_times_run_first_whatever_the_kind_or_order_of_scheduling() -> None:
    queue = EventQueue()
    log: list[tuple[float, str]] = []
    queue.schedule(3.0, EventKind.STEP_END, recorder(queue, log, "c"))
    queue.schedule(1.0, EventKind.ARRIVAL, recorder(queue, log, "a"))
    queue.schedule(2.0, EventKind.KV_ARRIVED, recorder(queue, log, "b"))
    assert len(queue) == 3
    queue.run()
    assert log == [(1.0, "a"), (2.0, "b"), (3.0, "c")]
    assert queue.now == 3.0
    assert len(queue) == 0


def test_at_one_instant_step_end_then_kv_arrived_then_arrival() -> None:
    queue = EventQueue()
    log: list[tuple[float, str]] = []
    for kind in (EventKind.ARRIVAL, EventKind.KV_ARRIVED, EventKind.STEP_END):
        queue.schedule(5.0, kind, recorder(queue, log, kind.name))
    queue.run()
    assert log == [(5.0, "STEP_END"), (5.0, "KV_ARRIVED"), (5.0, "ARRIVAL")]
    assert [int(k) for k in (EventKind.STEP_END, EventKind.KV_ARRIVED, EventKind.ARRIVAL)] == \
        [0, 1, 2]


def test_within_a_kind_the_first_scheduled_runs_first() -> None:
    queue = EventQueue()
    log: list[tuple[float, str]] = []
    names = ["z", "a", "m", "b", "y"]  # not sorted: order must come from scheduling alone
    for name in names:
        queue.schedule(1.0, EventKind.ARRIVAL, recorder(queue, log, name))
    queue.schedule(1.0, EventKind.STEP_END, recorder(queue, log, "step"))  # scheduled last
    queue.run()
    assert [name for _, name in log] == ["step", *names]


def test_an_action_may_schedule_at_now_and_it_runs_in_kind_order() -> None:
    """Work scheduled by an event for the same instant joins the heap by its kind."""
    queue = EventQueue()
    log: list[tuple[float, str]] = []

    def step_end() -> None:
        log.append((queue.now, "step"))
        queue.schedule(queue.now, EventKind.KV_ARRIVED, recorder(queue, log, "kv"))
        queue.schedule(queue.now + 0.5, EventKind.STEP_END, recorder(queue, log, "step2"))

    queue.schedule(1.0, EventKind.ARRIVAL, recorder(queue, log, "arrival"))
    queue.schedule(1.0, EventKind.STEP_END, step_end)
    queue.run()
    # the KV event scheduled during the step end still beats the arrival scheduled before it
    assert log == [(1.0, "step"), (1.0, "kv"), (1.0, "arrival"), (1.5, "step2")]
    assert queue.num_processed == 4


@pytest.mark.parametrize("at", [-0.001, math.nan, math.inf, -math.inf])
def test_past_or_non_finite_times_are_refused(at: float) -> None:
    queue = EventQueue()
    with pytest.raises(InvalidParamsError) as caught:
        queue.schedule(at, EventKind.ARRIVAL, lambda: None)
    assert str(caught.value) == ("INVALID_PARAMS: event time must be finite and >= now (0.0), "
                                 f"got {at}")
    assert len(queue) == 0


def test_scheduling_before_now_is_refused_once_the_clock_moved() -> None:
    queue = EventQueue()
    queue.schedule(2.0, EventKind.ARRIVAL, lambda: None)
    queue.run()
    with pytest.raises(InvalidParamsError, match=r"finite and >= now \(2\.0\), got 1\.5"):
        queue.schedule(1.5, EventKind.STEP_END, lambda: None)
    queue.schedule(2.0, EventKind.STEP_END, lambda: None)  # now itself is fine
    assert len(queue) == 1


def test_run_until_stops_before_later_events_and_resumes() -> None:
    queue = EventQueue()
    log: list[tuple[float, str]] = []
    for at, name in ((1.0, "a"), (2.0, "b"), (2.0, "c"), (3.5, "d")):
        queue.schedule(at, EventKind.ARRIVAL, recorder(queue, log, name))
    queue.run(until=2.0)  # an event exactly at ``until`` runs
    assert log == [(1.0, "a"), (2.0, "b"), (2.0, "c")]
    assert (queue.now, queue.num_processed, len(queue)) == (2.0, 3, 1)
    queue.run(until=3.0)  # nothing due: the clock stays at the last event
    assert (queue.now, queue.num_processed, len(queue)) == (2.0, 3, 1)
    queue.run()
    assert log[-1] == (3.5, "d")
    assert (queue.now, queue.num_processed, len(queue)) == (3.5, 4, 0)


def test_num_processed_counts_every_action_run() -> None:
    queue = EventQueue()
    assert (queue.now, queue.num_processed, len(queue)) == (0.0, 0, 0)
    queue.run()  # an empty heap is fine
    assert queue.num_processed == 0
    for n in range(7):
        queue.schedule(float(n % 3), EventKind(n % 3), lambda: None)
    queue.run()
    assert queue.num_processed == 7


def test_the_same_schedule_gives_the_same_order() -> None:
    def replay() -> list[tuple[float, str]]:
        queue = EventQueue()
        log: list[tuple[float, str]] = []
        for n in range(50):
            queue.schedule(float((n * 7) % 5), EventKind((n * 2) % 3),
                           recorder(queue, log, f"e{n}"))
        queue.run()
        return log

    first = replay()
    assert first == replay()
    expected = sorted(range(50), key=lambda n: ((n * 7) % 5, (n * 2) % 3, n))
    assert [name for _, name in first] == [f"e{n}" for n in expected]
