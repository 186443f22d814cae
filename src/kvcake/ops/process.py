"""Child server processes for tests, benchmarks and ``kvcake up``: start, wait until ready,
stop by pid. Only processes started here are ever signalled.

A kvcake server is ready when it writes its ready file (:class:`ReadyFile`; the child's
``--ready-file``, :mod:`kvcake.common.lifespan`), which names its endpoints; another server
(etcd, Redis) when its output matches a regex.

Output goes to a temporary file rather than a pipe: nobody reads a server's output after it
is ready, and a full pipe would block a chatty server mid-write.

Each child gets a private scratch directory as its ``TMPDIR`` (and its children's, unless they
are told otherwise), removed when it is stopped or killed: what a child leaves there when it
is killed (a vLLM instance's IPC sockets, a sidecar's control files) goes with it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kvcake.common.errors import KvcakeError
from kvcake.common.lifespan import read_ready_file

_POLL_S = 0.02
_ERROR_LINE = re.compile(r"^kvcake[\w -]*: error: .*$", re.MULTILINE)


@dataclass(frozen=True)
class ReadyFile:
    """Readiness by ready file: ``--ready-file PATH`` is added to the command (``path``
    empty: one in a private temporary directory); ready once the file names the endpoint
    ``want`` (any endpoint when empty)."""

    path: str = ""
    want: str = ""


class ServerProcess:
    """Runs ``command``; the constructor returns once it is ready, or stops it and raises
    with its output so far (``wait=False``: at once; :func:`wait_ready` then waits for
    several started together). ``ready`` is a :class:`ReadyFile` (then ``self.endpoints``
    holds the endpoints it names) or a regex its output must match (then ``self.match``
    holds the match). ``stop`` closes its standard input (peers that stop on end of input),
    then SIGTERM, then SIGKILL; ``stop`` and ``kill`` remove its scratch directory."""

    def __init__(self, command: Sequence[str], ready: str | ReadyFile, timeout_s: float = 60.0,
                 name: str = "", log_path: str | None = None, wait: bool = True) -> None:
        self.command = list(command)
        self.name = name or " ".join(self.command[-6:])
        self.endpoints: dict[str, str] = {}
        # short: a grandchild's Unix sockets in it must fit 107 bytes of path, nested twice
        self._scratch: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
            prefix="kvcake-", ignore_cleanup_errors=True)  # a grandchild may linger
        scratch = self._scratch.name
        if isinstance(ready, ReadyFile):
            ready = ReadyFile(ready.path or f"{scratch}/ready", ready.want)
            self.command += ["--ready-file", ready.path]
        self._ready = ready
        self._deadline = time.monotonic() + timeout_s
        # closed by stop/kill; a named log stays on disk
        self._log: IO[bytes] = open(log_path, "w+b") if log_path \
            else tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE,
                                        stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "TMPDIR": scratch})
        if wait:
            try:
                wait_ready([self])
            except BaseException:  # a caller's timeout or Ctrl-C mid-wait: nobody else holds
                self.stop()       # this child yet, so it would outlive us
                raise

    def started(self) -> bool:
        """Whether it is ready; raises with its output if it exited or its time ran out."""
        if self._is_ready():
            return True
        if not self.alive() or time.monotonic() > self._deadline:
            raise KvcakeError(f"{self.name} did not start: {self.tail()}")
        return False

    def _is_ready(self) -> bool:
        ready = self._ready
        if isinstance(ready, str):
            self.match = re.search(ready, self.output())
            return self.match is not None
        self.endpoints = read_ready_file(Path(ready.path)) or {}
        return bool(self.endpoints) and (not ready.want or ready.want in self.endpoints)

    def output(self) -> str:
        if self._log.closed:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def tail(self, chars: int = 800) -> str:
        """What it said last: the one line a kvcake command prints when it fails
        (``kvcake: error: …``), else the last ``chars`` of its output."""
        output = self.output()
        errors = _ERROR_LINE.findall(output)
        said = errors[-1] if errors else output[-chars:].strip()
        return f"[{self.name} output] {said}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.alive():
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.terminate()
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
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        self._log.close()
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def kvcake_command(*args: str, prefix: Sequence[str] = ()) -> list[str]:
    return [*prefix, sys.executable, "-m", "kvcake.cli", *args]


def start_master(*args: str, prefix: Sequence[str] = (),
                 log_path: str | None = None) -> tuple[ServerProcess, str]:
    """``kvcake master`` on an ephemeral port (unless ``args`` say otherwise); its endpoint."""
    command = kvcake_command("master", "--port", "0", "--metrics-port", "0", *args,
                             prefix=prefix)
    process = ServerProcess(command, ReadyFile(want="rpc"), name="kvcake master",
                            log_path=log_path)
    return process, process.endpoints["rpc"]


def start_node(master: str, segment_size: str, *args: str, prefix: Sequence[str] = (),
               log_path: str | None = None) -> ServerProcess:
    command = kvcake_command("node", "--master", master, "--segment-size", segment_size, *args,
                             prefix=prefix)
    return ServerProcess(command, ReadyFile(), name="kvcake node", log_path=log_path)


DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


def health(url: str, timeout_s: float = 2.0) -> tuple[int, dict[str, Any]]:
    """``GET url/health``: the status (0 when nothing answers) and the JSON body, a 503's
    too ({} when it is not a JSON object)."""
    try:
        with DIRECT.open(f"{url}/health", timeout=timeout_s) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, b""
        with exc, contextlib.suppress(OSError, http.client.HTTPException):
            raw = exc.read()
    except OSError:
        return 0, {}
    try:
        body = json.loads(raw)
    except ValueError:  # another server's plain-text health answer
        return status, {}
    return status, body if isinstance(body, dict) else {}


def wait_ready(processes: Sequence[ServerProcess]) -> None:
    """Until every one of ``processes`` (started together) is ready; raises with the output
    of the first that exits or runs out of time. Stopping them is the caller's."""
    waiting = list(processes)
    while waiting:
        waiting = [process for process in waiting if not process.started()]
        if waiting:
            time.sleep(_POLL_S)
