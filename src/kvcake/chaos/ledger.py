"""What the workload saw, kept so the checks can be decided afterwards.

* every operation's outcome: its kind (``put``, ``get``, ``stream``), its result (``ok``,
  ``not_found``, a Mooncake error-code name, ``wrong_bytes``, ``hang``, ...) and when it ran;
* every acknowledged put (the store answered OK): its size, its digest and the segments its
  replicas landed on, so "an object with a surviving replica" is decidable after a fault.

Recovery time of one kind, after a fault at ``t0``: until the first ok operation that
started after the last failure of that kind ended (so a kind that fails for a while recovers
when it stops failing, not at its first lucky success)::

    t0     failures ...    last failure ends    first ok op started after it ends
    │───────────────────────────│──────────────────────────│
    └──────────────────────── recovery ────────────────────┘

With no failure after the fault it is the first ok op that started after ``t0``; the
scenario's recovery is the slowest kind's. ``None``: that kind never succeeded again.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

OK = "ok"
NOT_FOUND = "not_found"
WRONG_BYTES = "wrong_bytes"
HANG = "hang"


@dataclass(frozen=True)
class Outcome:
    kind: str
    result: str
    started: float
    ended: float


@dataclass(frozen=True)
class Written:
    """An acknowledged put. ``pinned``: hard-pinned, so no eviction may take it."""

    size: int
    digest: bytes
    segments: frozenset[str]
    pinned: bool = False


@dataclass
class Ledger:
    clock: Callable[[], float] = time.monotonic
    outcomes: list[Outcome] = field(default_factory=list)
    acknowledged: dict[str, Written] = field(default_factory=dict)
    attempted: list[str] = field(default_factory=list)

    def record(self, kind: str, result: str, started: float) -> None:
        self.outcomes.append(Outcome(kind, result, started, self.clock()))

    def acknowledge(self, key: str, written: Written) -> None:
        self.acknowledged[key] = written

    @property
    def num_operations(self) -> int:
        return len(self.outcomes)

    def errors(self) -> dict[str, int]:
        """Results other than ``ok``, counted by ``kind:result``."""
        counts = Counter(f"{o.kind}:{o.result}" for o in self.outcomes if o.result != OK)
        return dict(sorted(counts.items()))

    def count(self, result: str) -> int:
        return sum(1 for o in self.outcomes if o.result == result)

    def recovery_s(self, fault_at: float,
                   tolerated: frozenset[str] = frozenset({OK})) -> float | None:
        """Seconds from ``fault_at`` until every kind seen after it succeeded again;
        ``tolerated``: results that are not failures (``ok``, and e.g. ``not_found`` where
        objects may rightly be gone)."""
        kinds = sorted({o.kind for o in self.outcomes if o.started >= fault_at})
        times = [self._recovered_at(kind, fault_at, tolerated) for kind in kinds]
        if not times or any(t is None for t in times):
            return None
        return max(t for t in times if t is not None) - fault_at

    def _recovered_at(self, kind: str, fault_at: float,
                      tolerated: frozenset[str]) -> float | None:
        after = [o for o in self.outcomes if o.kind == kind and o.started >= fault_at]
        since = max((o.ended for o in after if o.result not in tolerated), default=fault_at)
        return min((o.ended for o in after if o.result == OK and o.started >= since),
                   default=None)
