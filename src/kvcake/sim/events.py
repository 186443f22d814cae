"""The event heap: simulated time advances from one event to the next, deterministically.

Events are ordered by ``(time, kind, sequence)``: at equal times a lower kind runs first
(work that completes frees capacity before new work looks for it), and within a kind the
event scheduled first runs first. Nothing depends on Python's hash order or on object ids,
so the same input gives the same run, byte for byte.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from enum import IntEnum

from kvcake.common.errors import InvalidParamsError

Action = Callable[[], None]


class EventKind(IntEnum):
    """Tie order at one instant."""

    STEP_END = 0  # an instance's engine step finishes: tokens out, requests leave
    KV_ARRIVED = 1  # a prefilled request's KV reached its decode instance
    ARRIVAL = 2  # a request reaches the Conductor


class EventQueue:
    """A clock and the actions due at future instants."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, int, Action]] = []
        self._seq = 0
        self.num_processed = 0

    def schedule(self, at: float, kind: EventKind, action: Action) -> None:
        """Run ``action`` at simulated time ``at`` (never before now)."""
        if not math.isfinite(at) or at < self.now:
            raise InvalidParamsError(f"event time must be finite and >= now ({self.now}), "
                                     f"got {at}")
        heapq.heappush(self._heap, (at, kind, self._seq, action))
        self._seq += 1

    def run(self, until: float = math.inf) -> None:
        """Process events in order until none is left or the next one is after ``until``."""
        heap = self._heap
        while heap and heap[0][0] <= until:
            at, _, _, action = heapq.heappop(heap)
            self.now = at
            action()
            self.num_processed += 1

    def __len__(self) -> int:
        return len(self._heap)
