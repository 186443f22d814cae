"""Child servers never outlive an interrupted start."""

from __future__ import annotations

import signal
import sys
from types import FrameType

import pytest

from kvcake.common.errors import KvcakeError
from kvcake.ops import ServerProcess

SILENT = [sys.executable, "-c", "import time; print('starting', flush=True); time.sleep(120)"]


class StartInterruptedError(Exception):
    pass


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise StartInterruptedError


def test_a_child_whose_wait_is_interrupted_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test's timeout or Ctrl-C lands while the constructor waits for the ready line:
    no caller holds the child yet, so the constructor must end it."""
    started: list[ServerProcess] = []
    real_check = ServerProcess.started

    def check_then_interrupt(self: ServerProcess) -> bool:
        if not started:  # the wait's first look: the interrupt lands while it waits
            started.append(self)
            signal.signal(signal.SIGALRM, _interrupt)
            signal.setitimer(signal.ITIMER_REAL, 0.3)
        return real_check(self)

    monkeypatch.setattr(ServerProcess, "started", check_then_interrupt)
    try:
        with pytest.raises(StartInterruptedError):
            ServerProcess(SILENT, r"never", timeout_s=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    [child] = started
    assert child.process.poll() is not None, "the child outlived the interrupted start"


def test_a_child_that_never_gets_ready_is_stopped_and_named() -> None:
    with pytest.raises(KvcakeError, match=r"did not start: .*starting"):
        ServerProcess(SILENT, r"never", timeout_s=0.5, name="silent")
