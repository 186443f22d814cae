"""A standalone transfer peer: one process that owns a segment and serves it until told to stop.

Used by ``kvcake transfer serve``, the benchmarks and the multi-process tests. It prints one
JSON line (its endpoint and the segment's p2p name) once ready, then serves until SIGTERM,
SIGINT, or its standard input closes.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from kvcake.common.errors import KvcakeError
from kvcake.common.lifespan import StopSignals
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.engine import TransferEngine


def serve_segment(config: TransferConfig, name: str, size: int, fill: int | None) -> None:
    stop = StopSignals()
    with TransferEngine(config) as engine:
        segment = engine.register_segment(name, size)
        if fill is not None:
            _fill_pattern(segment.view, fill)
        ready = {
            "endpoint": engine.endpoint,
            "segment": f"{engine.endpoint}/{name}",
            "size": size,
            "host_id": engine.host_id,
        }
        print(json.dumps(ready), flush=True)
        stop.stop_on_end_of_input()
        stop.wait()


def pattern(seed: int, size: int) -> bytes:
    """Deterministic bytes that differ at every offset (so misplaced copies show)."""
    block = bytes((seed * 131 + i * 7 + (i >> 8)) & 0xFF for i in range(65521))
    return (block * (size // len(block) + 1))[:size]


def _fill_pattern(view: memoryview, seed: int) -> None:
    view[:] = pattern(seed, view.nbytes)


class PeerProcess:
    """``kvcake transfer serve`` in a child process; ``prefix`` wraps the command (e.g.
    ``ip netns exec NS``). Ends only the process it started."""

    def __init__(
        self,
        name: str,
        size: int,
        fill: int | None = None,
        args: Sequence[str] = (),
        prefix: Sequence[str] = (),
        ready_timeout_s: float = 60.0,
    ) -> None:
        command = [*prefix, sys.executable, "-m", "kvcake.cli", "transfer", "serve",
                   "--name", name, "--size", str(size), *args]
        if fill is not None:
            command += ["--fill", str(fill)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.info = self._await_ready(ready_timeout_s)

    def _await_ready(self, timeout_s: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        line = self.process.stdout.readline() if ready else b""
        if not line:
            self.kill()
            raise KvcakeError(f"transfer peer did not start (exit code {self.process.poll()})")
        info: dict[str, Any] = json.loads(line)
        return info

    @property
    def segment(self) -> str:
        return str(self.info["segment"])

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_pipes()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
