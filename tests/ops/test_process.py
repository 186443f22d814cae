"""Child servers never outlive an interrupted start, nor leave their temporary files behind
when killed; a server's health is read whatever it answers."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

import pytest

from kvcake.common.errors import KvcakeError
from kvcake.ops import ServerProcess, health

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


LEAVES_A_FILE = [sys.executable, "-c", "import tempfile, time; "
                 "fd, path = tempfile.mkstemp(prefix='left-'); print(path, flush=True); "
                 "time.sleep(120)"]


def test_what_a_killed_child_leaves_in_its_temporary_directory_goes_with_it() -> None:
    """A test that SIGKILLs an instance kills the code that would remove its temporary
    files (vLLM's IPC sockets among them): they live in the child's own scratch directory,
    which stopping the child removes."""
    child = ServerProcess(LEAVES_A_FILE, r"(\S*left-\S*)\n", name="leaves a file")
    left = Path(child.match.group(1))
    assert left.exists()
    assert left.parent != Path(tempfile.gettempdir()), "the child wrote to the shared /tmp"
    os.kill(child.pid, signal.SIGKILL)
    child.process.wait()
    child.stop()
    assert not left.exists() and not left.parent.exists()


@pytest.mark.parametrize(("status", "body", "parsed"), [
    (200, b'{"ready": true}', {"ready": True}),
    (503, b'{"ready": false, "details": {"instances": {"prefill": 1}}}',
     {"ready": False, "details": {"instances": {"prefill": 1}}}),
    (503, b"Service Unavailable", {}),
])
def test_health_reads_the_body_of_every_answer(status: int, body: bytes,
                                               parsed: dict[str, object]) -> None:
    """A 503's details count too: a cluster short of an instance says which are left."""

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.handle_request)
    thread.start()
    try:
        assert health(f"http://127.0.0.1:{server.server_port}") == (status, parsed)
    finally:
        thread.join(5)
        server.server_close()


def test_health_of_nothing_listening_is_status_0() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: refused
        assert health(f"http://127.0.0.1:{port}", timeout_s=1.0) == (0, {})
