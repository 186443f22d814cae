"""Starting and stopping one ``kvcake up`` set-up for ``kvcake bench serve``.

A set-up counts as up once ``kvcake up`` has said it is serving (every instance registered)
and ``/health`` answers 200. It is stopped by its pid: SIGINT (``kvcake up`` then stops its
own children), then SIGTERM, then SIGKILL, each after a bounded wait.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from kvcake.common.errors import KvcakeError
from kvcake.ops import health

_STOP_WAIT_S = ((signal.SIGINT, 30.0), (signal.SIGTERM, 10.0))  # then SIGKILL


def log_tail(work: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of every file under ``work``, each under its path."""
    parts = [f"--- {path.relative_to(work)} ---\n"
             + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
             for path in sorted(work.rglob("*")) if path.is_file()]
    return "\n".join(parts) or "(no log output)"


@contextmanager
def launched(command: Sequence[str], url: str, work: Path,
             health_timeout_s: float) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` (output to ``work/launcher.out``), wait for ``url/health`` to answer
    200, yield the process, then stop it (:func:`stop_process`). Raises ``KvcakeError``
    with the tails of the logs under ``work`` if it exits first or is not healthy within
    ``health_timeout_s``."""
    with (work / "launcher.out").open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        _wait_healthy(process, url, health_timeout_s, work)
        yield process
    finally:
        stop_process(process)


def _wait_healthy(process: subprocess.Popen[bytes], url: str, timeout_s: float,
                  work: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not (_serving(work) and health(url)[0] == 200):
        if process.poll() is not None:
            raise KvcakeError(f"{url}: the server exited with code {process.returncode} "
                              f"before it was healthy\n{log_tail(work)}")
        if time.monotonic() > deadline:
            raise KvcakeError(f"{url}/health did not answer 200 within {timeout_s:g} s\n"
                              f"{log_tail(work)}")
        time.sleep(0.5)


def _serving(work: Path) -> bool:
    """``kvcake up`` says so once every instance has registered (``/health`` is 200 as soon
    as one prefill and one decode instance have)."""
    out = work / "launcher.out"
    return "kvcake up: serving" in out.read_text(errors="replace") if out.exists() else False


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a child started here, by its pid: SIGINT for a graceful shutdown, then SIGTERM,
    then SIGKILL, each after a bounded wait."""
    for sig, wait_s in _STOP_WAIT_S:
        if process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
    if process.poll() is None:
        process.kill()
        process.wait()
