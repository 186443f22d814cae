"""A scenario's life, the same for all: start, steady load, fault, repair, checks.

::

    start ─> load ──────────────────────────────────────────────> stop ─> check ─> close
               │ warmup │ fault ── fault window ── repair │ settle │
                        t0 (recovery is measured from here)

Subclasses fill in the hooks; :meth:`Scenario.run` owns the order and the clean-up (every
process a scenario started is stopped by pid, also when a step raises).
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from kvcake.chaos.ledger import Ledger
from kvcake.ops import NetnsPair, ServerProcess


@dataclass(frozen=True)
class ChaosSettings:
    """seed: names every workload's operation sequence. quick: the short form (CI)."""

    seed: int = 0
    quick: bool = False

    def seconds(self, quick: float, full: float) -> float:
        return quick if self.quick else full


@dataclass
class ScenarioResult:
    """One row of the table. ``wrong_bytes``, ``lost_objects`` and ``hangs`` must be 0 and
    ``integrity`` must be ``ok``; ``recover_s`` is None when the load never recovered."""

    name: str
    operations: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    wrong_bytes: int = 0
    lost_objects: int = 0
    hangs: int = 0
    recover_s: float | None = None
    integrity: str = "ok"
    checked: int = 0
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    skipped: str = ""  # why the scenario could not run here (then it neither passes nor fails)

    def failures(self) -> list[str]:
        """Why this row fails (empty: it passes)."""
        if self.skipped:
            return []
        bad = [f"{name} {value}" for name, value in (
            ("wrong bytes", self.wrong_bytes), ("lost objects", self.lost_objects),
            ("hangs", self.hangs)) if value]
        if self.integrity != "ok":
            bad.append(f"integrity: {self.integrity}")
        return bad


class Scenario(ABC):
    """Hooks run in this order: start (blocking, in a thread), open, load (until stopped),
    fault, repair, check, close; start, load, fault and check have no default. ``needs``:
    what the scenario must have ("netns", "etcd", "model"), for a clear skip message."""

    name: ClassVar[str]
    summary: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: ChaosSettings, hosts: NetnsPair | None = None) -> None:
        self.settings = settings
        self.hosts = hosts
        self.ledger = Ledger()
        self.processes: list[ServerProcess] = []
        self.notes: list[str] = []

    # timings (seconds): quick, full
    warmup_s: ClassVar[tuple[float, float]] = (1.5, 4.0)
    window_s: ClassVar[tuple[float, float]] = (3.0, 6.0)
    settle_s: ClassVar[tuple[float, float]] = (3.0, 6.0)

    def _s(self, pair: tuple[float, float]) -> float:
        return self.settings.seconds(*pair)

    async def run(self) -> ScenarioResult:
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.start)
            await self.open()
            result = await self._drive()
        finally:
            await self.close()
            await asyncio.to_thread(self.stop_processes)
        result.notes = self.notes + result.notes
        result.wall_s = round(time.monotonic() - started, 1)
        return result

    async def _drive(self) -> ScenarioResult:
        stop = asyncio.Event()
        load = asyncio.ensure_future(self.load(stop))
        try:
            await asyncio.sleep(self._s(self.warmup_s))
            await self.before_fault()
            fault_at = self.ledger.clock()
            await self.fault()
            await asyncio.sleep(self._s(self.window_s))
            await self.repair()
            await asyncio.sleep(self._s(self.settle_s))
        finally:
            stop.set()
            await load
        return await self.check(fault_at)

    def stop_processes(self) -> None:
        for process in reversed(self.processes):
            process.stop(timeout_s=10.0)
        self.processes.clear()

    @abstractmethod
    def start(self) -> None:
        """Start the processes (blocking; runs in a thread)."""

    async def open(self) -> None:
        """Connect the workload's clients."""
        return None  # a hook: subclasses that need it override it

    @abstractmethod
    async def load(self, stop: asyncio.Event) -> None:
        """The steady workload, until ``stop`` is set; every op is recorded in the ledger."""

    async def before_fault(self) -> None:
        """Wait for the moment the fault should hit (default: at once)."""
        return None  # a hook: subclasses that need it override it

    @abstractmethod
    async def fault(self) -> None:
        """Inject the scenario's fault."""

    async def repair(self) -> None:
        """Undo the fault where that is possible (default: nothing)."""
        return None  # a hook: subclasses that need it override it

    @abstractmethod
    async def check(self, fault_at: float) -> ScenarioResult:
        """The row: outcomes from the ledger, then the scenario's own checks."""

    async def close(self) -> None:
        """Close the workload's clients (must not raise)."""
        return None  # a hook: subclasses that need it override it
