"""One server process's life, as uvicorn's ``Server`` runs one::

    async with Lifespan("worker", ready_file) as life:   # SIGINT/SIGTERM captured from here
        server = WorkerServer(config)
        life.on_stop("worker", server.shutdown)          # stop phases, run newest first
        endpoint = await server.startup()
        await life.serve("kvcake worker listening on …", {"rpc": endpoint})
    # every stop phase ran (each bounded), the ready file is gone, and only now are the
    # signal handlers the process had before put back

- A signal during start-up is kept: ``serve`` then returns at once, unannounced, and the
  phases registered so far run.
- A second signal during shutdown is noted, never fatal: a child is not killed half-stopped.
- The ready file (``--ready-file``) is how a parent learns that a child serves, and where:
  JSON ``{"pid": …, "endpoints": {name: address}}`` (``HOST:PORT``, or a segment's name),
  written whole (rename) once serving,
  removed on the way out. Log lines are for people.
- Each stop phase gets ``phase_timeout_s``; one that overruns is logged and left behind, so
  shutting down never hangs. Phase durations are measured with the injected ``clock``.
- A process without a loop (``kvcake up``, helper peers) waits for SIGINT/SIGTERM through
  :class:`StopSignals`, whose handler takes no lock (see there).
- Siblings started together (``kvcake up`` starts its instances at once) time their start-up
  profiles in turns, each once all have loaded (:class:`StartupTurns`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import json
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from kvcake.common.errors import KvcakeError
from kvcake.common.log import get_logger

log = get_logger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PHASE_TIMEOUT_S = 12.0  # a worker's engine thread joins within 10 s
Clock = Callable[[], float]
StopPhase = Callable[[], Awaitable[None] | None]
PreviousHandler = Callable[[int, FrameType | None], Any] | int | None


class Lifespan:
    """Signals, readiness and phased shutdown of one process (see the module docstring)."""

    def __init__(self, name: str, ready_file: str = "", *, clock: Clock = time.monotonic,
                 phase_timeout_s: float = PHASE_TIMEOUT_S) -> None:
        self.name = name
        self.ready_file = Path(ready_file) if ready_file else None
        self.clock = clock
        self.phase_timeout_s = phase_timeout_s
        self.stopping = asyncio.Event()
        self.signals_seen: list[int] = []
        self._phases: list[tuple[str, StopPhase]] = []
        self._previous: dict[int, PreviousHandler] = {}

    async def __aenter__(self) -> Lifespan:
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            loop.add_signal_handler(signum, self._on_signal, signum)
        return self

    def _on_signal(self, signum: int) -> None:
        self.signals_seen.append(signum)
        if self.stopping.is_set():
            log.warning("%s: %s while stopping; still stopping", self.name,
                        signal.Signals(signum).name)
        self.stopping.set()

    def on_stop(self, name: str, stop: StopPhase) -> None:
        """Register a stop phase (a coroutine function, or a plain one); phases run newest
        first when the lifespan ends."""
        self._phases.append((name, stop))

    async def serve(self, announcement: str, endpoints: Mapping[str, str]) -> None:
        """:meth:`announce`, then wait for a stop signal (or :meth:`stop`)."""
        if not self.stopping.is_set():
            self.announce(announcement, endpoints)
        await self.stopping.wait()

    def announce(self, announcement: str, endpoints: Mapping[str, str]) -> None:
        """Say where it serves: a line for people, the ready file (rewritten) for parents."""
        print(announcement, flush=True)
        if self.ready_file is not None:
            write_ready_file(self.ready_file, endpoints)

    def stop(self) -> None:
        """End :meth:`serve` as a signal would (a server that ends by itself)."""
        self.stopping.set()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            if self.ready_file is not None:
                self.ready_file.unlink(missing_ok=True)
            for name, stop in reversed(self._phases):
                await self._run_phase(name, stop)
        finally:
            self._restore_signals()

    async def _run_phase(self, name: str, stop: StopPhase) -> None:
        started = self.clock()
        try:
            result = stop()
            if inspect.isawaitable(result):
                await bounded(result, f"{self.name}: {name}", self.phase_timeout_s)
        except Exception:  # a failed phase must not skip the phases after it
            log.exception("%s: stopping %s failed", self.name, name)
        log.debug("%s: %s stopped in %.3f s", self.name, name, self.clock() - started)

    def _restore_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum, previous in self._previous.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


async def bounded(work: Awaitable[Any], what: str, timeout_s: float = PHASE_TIMEOUT_S) -> None:
    """Await ``work`` for ``timeout_s`` at most; one that overruns is logged and left."""
    try:
        await asyncio.wait_for(work, timeout_s)
    except TimeoutError:
        log.warning("shutdown: %s did not stop within %g s; leaving it", what, timeout_s)


def write_ready_file(path: Path, endpoints: Mapping[str, str]) -> None:
    """``{"pid": …, "endpoints": …}`` at ``path``, whole or not at all (a reader polling
    for it never sees half a file)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps({"pid": os.getpid(), "endpoints": dict(endpoints)}))
    partial.replace(path)


def read_ready_file(path: Path) -> dict[str, str] | None:
    """The endpoints a ready file names, or ``None`` while there is none."""
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    endpoints = body.get("endpoints") if isinstance(body, dict) else None
    if not isinstance(endpoints, dict):
        raise KvcakeError(f"{path} is not a kvcake ready file: {body!r}")
    return {str(k): str(v) for k, v in endpoints.items()}


class StartupTurns:
    """Instances started together (``kvcake up`` starts them at once) time their start-up
    profiles one at a time, and only once every one of them has loaded, so that no profile
    is timed beside a sibling's work. Each holds a shared ``flock`` on a file they share from
    its construction until its turn, and an exclusive one for its turn: that is granted only
    when no sibling still loads or profiles. An empty path: no lock, every turn at once.

        turns = StartupTurns(path)        # at start, before loading
        ...load...
        with turns.turn():                # or ``async with turns.turn_async()``
            ...profile...
    """

    def __init__(self, path: str) -> None:
        self._file = open(path, "a") if path else None  # noqa: SIM115 (closed by close())
        if self._file is not None:
            # a sibling's turn under way (the lock is refused): it never waits for this one
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(self._file, fcntl.LOCK_SH | fcntl.LOCK_NB)

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        try:
            if self._file is not None:
                fcntl.flock(self._file, fcntl.LOCK_EX)
            yield
        finally:
            self.close()

    @contextlib.asynccontextmanager
    async def turn_async(self) -> AsyncIterator[None]:
        """:meth:`turn` for a coroutine: the lock is waited for off the loop."""
        try:
            if self._file is not None:
                await asyncio.to_thread(fcntl.flock, self._file, fcntl.LOCK_EX)
            yield
        finally:
            self.close()

    def close(self) -> None:
        """No turn is wanted (or it is over): the siblings' may go (closing unlocks)."""
        if self._file is not None:
            self._file.close()
            self._file = None


class StopSignals:
    """SIGINT and SIGTERM (or the end of standard input) as a flag that a main loop without
    an event loop polls. The handler only appends to a list: a Python handler runs in the
    main thread between two bytecodes, so one that called ``threading.Event.set`` could run
    inside another ``set`` of that thread (a second signal a moment after the first) and wait
    for ever for the lock its own thread holds. ``then(signum)`` runs in the handler after
    the append (it may raise, to abandon what the main thread was doing)."""

    def __init__(self, then: Callable[[int], None] | None = None,
                 signums: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.received: list[int] = []
        self._then = then
        for signum in signums:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)
        if self._then is not None:
            self._then(signum)

    def set(self) -> None:
        """Stop without a signal (from any thread)."""
        self.received.append(0)

    def stop_on_end_of_input(self) -> None:
        """Also stop once standard input ends (a parent that closes it wants us gone)."""
        def read_to_end() -> None:
            sys.stdin.buffer.read()
            self.set()
        threading.Thread(target=read_to_end, daemon=True).start()

    def wait(self, timeout_s: float | None = None, poll_s: float = 0.05) -> bool:
        """Until a stop came (True) or ``timeout_s`` passed (False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.received:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True
