"""A worker whose engine thread dies stops: the server is told (``kvcake worker`` then stops
serving and exits with the error, so the Conductor drops the instance when its reports
stop) rather than keep taking requests nothing runs; its shutdown still ends.

It lives beside the engine tests for their tiny-model fixture."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from kvcake.common import codec
from kvcake.common.aio import LoopThread
from kvcake.common.rpc import RpcClient
from kvcake.engine.config import EngineConfig
from kvcake.wire.sampling import SamplingParams
from kvcake.wire.worker import Prefill
from kvcake.worker.config import WorkerConfig
from kvcake.worker.server import WorkerServer

TIMEOUT_S = 10.0


def test_an_engine_step_that_raises_stops_the_worker(
        tiny_model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    config = WorkerConfig(role="both", conductor="127.0.0.1:1", profile=False, report_s=60.0)
    engine = EngineConfig(model=str(tiny_model_dir()), dtype="float32", kv_cache_bytes=1 << 20,
                          max_model_len=96, max_num_seqs=8)
    thread = LoopThread("engine-death")
    died = threading.Event()

    async def start() -> WorkerServer:
        server = WorkerServer(config, engine)
        server.on_engine_death(died.set)
        await server.startup()
        return server

    server = thread.run(start(), 60.0)
    try:
        def step() -> list[object]:
            raise RuntimeError("a broken kernel")
        monkeypatch.setattr(server.core, "step", step)
        thread.run(_call(server.endpoint, Prefill("r1", [5, 6, 7], SamplingParams(max_tokens=2),
                                                  "t")), TIMEOUT_S)
        assert died.wait(TIMEOUT_S), "the server was never told"
        assert isinstance(server.engine_error, RuntimeError)
        assert not server.core.scheduler.requests  # the step's requests were aborted
    finally:
        thread.run(server.shutdown(), 60.0)
        thread.stop()


async def _call(endpoint: str, message: Prefill) -> None:
    client = RpcClient(endpoint, TIMEOUT_S)
    try:
        await client.call(codec.encode(message))
    finally:
        client.close()
