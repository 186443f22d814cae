"""A server process's lifespan: stop phases newest first and bounded, the ready file,
signals captured until every phase ran, then given back, and siblings' start-up turns."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvcake.common.lifespan import Lifespan, StartupTurns, read_ready_file
from kvcake.ops import ReadyFile, ServerProcess, kvcake_command


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_phases_run_newest_first_and_a_hung_or_failed_one_skips_none() -> None:
    stopped: list[str] = []

    async def hang() -> None:
        stopped.append("hung")
        await asyncio.Event().wait()

    async def fail() -> None:
        stopped.append("failed")
        raise RuntimeError("boom")

    async def main() -> None:
        async with Lifespan("t", phase_timeout_s=0.05) as life:
            life.on_stop("first", lambda: stopped.append("first"))
            life.on_stop("hung", hang)
            life.on_stop("failed", fail)
            life.stop()
            await life.serve("serving", {})

    run(main())
    assert stopped == ["failed", "hung", "first"]


def test_the_ready_file_names_the_endpoints_while_serving_and_goes_after(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    seen: list[dict[str, str] | None] = []

    async def main() -> None:
        async with Lifespan("t", str(ready)) as life:
            life.on_stop("look", lambda: seen.append(read_ready_file(ready)))
            asyncio.get_running_loop().call_soon(lambda: seen.append(read_ready_file(ready)))
            asyncio.get_running_loop().call_soon(life.stop)
            await life.serve("serving", {"rpc": "127.0.0.1:1"})

    run(main())
    assert seen == [{"rpc": "127.0.0.1:1"}, None]  # gone before the first stop phase
    assert not ready.exists() and list(tmp_path.iterdir()) == []


def test_a_signal_while_starting_stops_without_announcing(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    ready = tmp_path / "ready"

    async def main() -> None:
        async with Lifespan("t", str(ready)) as life:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(life.stopping.wait(), 10)
            await life.serve("serving", {"rpc": "127.0.0.1:1"})

    run(main())
    assert "serving" not in capsys.readouterr().out and not ready.exists()


def test_signals_stay_captured_through_shutdown_and_are_given_back_after() -> None:
    """A second SIGTERM while a phase runs is noted, not fatal; afterwards the handler the
    process had before is back."""
    caught: list[int] = []
    # SIGINT's own handler is whatever the test process started with (a process started in
    # the background by a shell without job control ignores it)
    sigint_before = signal.getsignal(signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, lambda signum, _: caught.append(signum))
    try:
        life = Lifespan("t")

        async def second_signal() -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.05)  # let the loop's handler see it

        async def main() -> None:
            async with life:
                life.on_stop("signalled", second_signal)
                os.kill(os.getpid(), signal.SIGINT)
                await life.serve("serving", {})

        run(main())
        assert life.signals_seen == [signal.SIGINT, signal.SIGTERM]
        assert caught == []
        os.kill(os.getpid(), signal.SIGTERM)  # now the process's own handler again
        assert caught == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is sigint_before
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_child_says_where_it_serves_in_its_ready_file() -> None:
    with ServerProcess(kvcake_command("master", "--port", "0", "--metrics-port", "0"),
                       ReadyFile(want="rpc"), name="master") as master:
        endpoints = dict(master.endpoints)
        ready = Path(master.command[master.command.index("--ready-file") + 1])
        assert read_ready_file(ready) == endpoints
    assert endpoints["rpc"].startswith("127.0.0.1:") and endpoints["metrics"]
    assert not ready.exists()


def test_startup_turns_wait_for_every_sibling_to_load_and_never_overlap(tmp_path: Path) -> None:
    path = str(tmp_path / "profile.lock")
    siblings = [StartupTurns(path) for _ in range(3)]  # all three loading
    inside, most, entered = [0], [0], threading.Event()
    guard = threading.Lock()

    def take_turn(turns: StartupTurns) -> None:
        with turns.turn():
            entered.set()
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)  # a profile's length: long enough to overlap if it could
            with guard:
                inside[0] -= 1

    threads = [threading.Thread(target=take_turn, args=(t,)) for t in siblings[:2]]
    for thread in threads:
        thread.start()
    # the third sibling still loads: no turn may begin
    assert not entered.wait(0.3)
    threads.append(threading.Thread(target=take_turn, args=(siblings[2],)))
    threads[-1].start()
    for thread in threads:
        thread.join(10)
    assert entered.is_set() and most[0] == 1
    with StartupTurns(path).turn():  # a later start (a restart) waits for nobody
        pass


def test_startup_turns_without_a_path_never_wait() -> None:
    first, second = StartupTurns(""), StartupTurns("")
    with first.turn(), second.turn():
        pass


def test_a_storm_of_stop_signals_still_stops_a_process_waiting_on_them() -> None:
    # a handler that took a lock (threading.Event.set) hung here every time: the next signal
    # ran the handler again inside the first one's set, which waited for its own lock
    code = ("from kvcake.common.lifespan import StopSignals; stop = StopSignals(); "
            "print('ready', flush=True); stop.wait(); print('stopped', flush=True)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        storm_ends = time.monotonic() + 0.3
        while time.monotonic() < storm_ends and child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
                os.kill(child.pid, signal.SIGINT)
        out, _ = child.communicate(timeout=20)
    finally:
        child.kill()
        child.wait()
    assert out.strip() == "stopped"  # (the storm may still kill it on its way out)
