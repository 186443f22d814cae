"""Helpers of the store's process tests: a server paused, a condition awaited, a call that
must answer within a bound."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

from kvcake.ops import ServerProcess


@contextlib.contextmanager
def stopped(process: ServerProcess) -> Iterator[None]:
    """``process`` paused (``SIGSTOP``) for the block."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


def is_stopped(process: ServerProcess) -> bool:
    """Whether ``process`` is stopped now (``T`` in ``/proc``: a ``SIGSTOP`` took effect)."""
    with open(f"/proc/{process.pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] in "tT"


def wait_for(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def answered_within(call: Callable[[], object], timeout_s: float) -> object:
    """``call()``'s result, from a thread; fails when it has not returned in time."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert result, f"no answer within {timeout_s} s"
    return result[0]
