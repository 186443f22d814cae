"""``kvcake up`` stopped while it starts: it stops at once and leaves no child behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kvcake.ops import kvcake_command


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_starting_stops_every_child(tmp_path: Path, signum: int) -> None:
    command = kvcake_command("up", "--port", "0", "--store-size", "64MiB",
                             "--kv-cache-size", "32MiB", "--log-dir", str(tmp_path))
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as up:
        seen: set[int] = set()
        deadline = time.monotonic() + 60
        while len(seen) < 2:  # the master and a node at least: a start well under way
            assert up.poll() is None and time.monotonic() < deadline, "up did not start"
            seen |= _children(up.pid)
            time.sleep(0.05)
        os.kill(up.pid, signum)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert "stopped while starting" in out
    assert not [pid for pid in seen if _alive(pid)], "a child outlived kvcake up"
