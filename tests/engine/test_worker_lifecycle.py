"""A worker's seats and engine thread, through its RPC server (the tiny model; its Conductor
is never reachable). A refused commit keeps its seat's deadline: the seat is freed in
time. A worker whose engine thread dies stops: the server is told (``kvcake worker`` then
stops serving and exits with the error, so the Conductor drops the instance when its
reports stop) rather than keep taking requests nothing runs; its shutdown still ends.

It lives beside the engine tests for their tiny-model fixture."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvcake.common.aio import LoopThread
from kvcake.common.errors import InvalidParamsError
from kvcake.engine.config import EngineConfig
from kvcake.wire.sampling import SamplingParams
from kvcake.wire.worker import Commit, Prefill, Release, Reserve
from kvcake.worker.config import WorkerConfig
from kvcake.worker.server import WorkerServer
from wire import call_once

TIMEOUT_S = 10.0


@pytest.fixture
def worker_of(tiny_model_dir: Callable[..., Path]
              ) -> Iterator[Callable[..., tuple[LoopThread, WorkerServer]]]:
    """``make(role, **config)``: a started worker on its own loop thread."""
    started: list[tuple[LoopThread, WorkerServer]] = []

    def make(role: str, **overrides: object) -> tuple[LoopThread, WorkerServer]:
        config = WorkerConfig(role=role, conductor="127.0.0.1:1", profile=False,
                              report_s=60.0, **overrides)
        engine = EngineConfig(model=str(tiny_model_dir()), dtype="float32",
                              kv_cache_bytes=1 << 20, max_model_len=96, max_num_seqs=8)
        thread = LoopThread(f"worker-{role}")
        server = WorkerServer(config, engine)
        thread.run(server.startup(), 60.0)
        started.append((thread, server))
        return thread, server

    yield make
    for thread, server in started:
        thread.run(server.shutdown(), 60.0)
        thread.stop()


def test_a_refused_commit_keeps_the_seats_deadline(
        worker_of: Callable[..., tuple[LoopThread, WorkerServer]]) -> None:
    thread, server = worker_of("decode", reserve_timeout_s=0.3, transfer_timeout_s=0.3)
    thread.run(call_once(server.endpoint, Reserve("r1", 20)), TIMEOUT_S)
    with pytest.raises(InvalidParamsError, match="prompt tokens for"):  # 40 for a 20's seat
        thread.run(call_once(server.endpoint, Commit("r1", list(range(40)), 1, 0.0,
                                                 SamplingParams(max_tokens=2), "t")), TIMEOUT_S)
    deadline = time.monotonic() + TIMEOUT_S
    while server.core.num_reserved:
        assert time.monotonic() < deadline, "the seat outlived its deadline"
        time.sleep(0.05)


def test_a_seat_is_held_while_its_grants_let_a_prefill_write(
        worker_of: Callable[..., tuple[LoopThread, WorkerServer]]) -> None:
    """Past ``reserve_timeout_s`` a prefill that committed at the last moment may still be
    writing (for ``transfer_timeout_s``): the blocks go to no one else meanwhile."""
    thread, server = worker_of("decode", reserve_timeout_s=0.1, transfer_timeout_s=60.0)
    thread.run(call_once(server.endpoint, Reserve("r1", 20)), TIMEOUT_S)
    time.sleep(0.5)  # past reserve_timeout_s, far short of the grants' end
    assert server.core.num_reserved == 1
    thread.run(call_once(server.endpoint, Release("r1")), TIMEOUT_S)
    assert server.core.num_reserved == 0


def test_an_engine_step_that_raises_stops_the_worker(
        worker_of: Callable[..., tuple[LoopThread, WorkerServer]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    thread, server = worker_of("both")
    died = threading.Event()
    server.on_engine_death(died.set)

    def step() -> list[object]:
        raise RuntimeError("a broken kernel")
    monkeypatch.setattr(server.core, "step", step)
    thread.run(call_once(server.endpoint, Prefill("r1", [5, 6, 7], SamplingParams(max_tokens=2),
                                              "t")), TIMEOUT_S)
    assert died.wait(TIMEOUT_S), "the server was never told"
    assert isinstance(server.engine_error, RuntimeError)
    assert not server.core.scheduler.requests  # the step's requests were aborted
