"""Child server processes for tests, benchmarks and ``kvcake up``: start, wait for the line
that says "ready", stop by pid. Only processes started here are ever signalled."""

from __future__ import annotations

import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from kvcake.common.errors import KvcakeError


class ServerProcess:
    """Runs ``command``; the constructor returns once a stdout line matches ``ready``
    (``self.match`` holds that match) or raises with the output seen so far."""

    def __init__(self, command: Sequence[str], ready: str, timeout_s: float = 60.0) -> None:
        self.command = list(command)
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self.match = self._await(re.compile(ready), timeout_s)

    def _await(self, ready: re.Pattern[str], timeout_s: float) -> re.Match[str]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.process.stdout], [], [], left)
            line = self.process.stdout.readline().decode(errors="replace") if readable else ""
            if not line and self.process.poll() is not None:
                break
            self.lines.append(line)
            if found := ready.search(line):
                return found
        self.kill()
        raise KvcakeError(f"{self.command[3:5]} did not start (exit {self.process.poll()}): "
                          f"{''.join(self.lines)[-800:]}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait()
        self._close()

    def _close(self) -> None:
        if self.process.stdout is not None and not self.process.stdout.closed:
            self.process.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def kvcake_command(*args: str, prefix: Sequence[str] = ()) -> list[str]:
    return [*prefix, sys.executable, "-m", "kvcake.cli", *args]


def start_master(*args: str, prefix: Sequence[str] = ()) -> tuple[ServerProcess, str]:
    """``kvcake master`` on an ephemeral port (unless ``args`` say otherwise); its endpoint."""
    command = kvcake_command("master", "--port", "0", "--metrics-port", "0", *args,
                             prefix=prefix)
    process = ServerProcess(command, r"listening on (\S+)")
    return process, process.match.group(1)


def start_node(master: str, segment_size: str, *args: str,
               prefix: Sequence[str] = ()) -> ServerProcess:
    command = kvcake_command("node", "--master", master, "--segment-size", segment_size, *args,
                             prefix=prefix)
    return ServerProcess(command, r"segment (\S+) .* mounted")
