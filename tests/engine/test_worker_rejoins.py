"""A worker re-registers only when the Conductor says it does not know it: after a Conductor
restart (same RPC port, empty state) the worker's next report is answered ``known=False``
and it registers with the new Conductor, which then routes to it again.

It lives beside the engine tests for their tiny-model fixture.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fuzzing import wait_until
from kvcake.common.aio import LoopThread
from kvcake.common.errors import KvcakeError
from kvcake.common.sockets import free_port
from kvcake.conductor.config import ConductorConfig, ConductorServerConfig
from kvcake.conductor.server import ConductorServer
from kvcake.engine.config import EngineConfig
from kvcake.wire.conductor import Register, Report, ReportReply
from kvcake.worker.config import WorkerConfig
from kvcake.worker.server import WorkerServer

TIMEOUT_S = 60.0


def _conductor(thread: LoopThread, port: int) -> ConductorServer:
    async def start() -> ConductorServer:
        server = ConductorServer(ConductorServerConfig(rpc_port=port, instance_ttl_s=30.0),
                                 ConductorConfig())
        await server.startup()
        return server
    return thread.run(start(), TIMEOUT_S)


def _knows(thread: LoopThread, server: ConductorServer, instance_id: str) -> bool:
    async def look() -> bool:
        return instance_id in server.instances
    return thread.run(look(), TIMEOUT_S)


def _wait_known(thread: LoopThread, server: ConductorServer, instance_id: str) -> None:
    wait_until(lambda: _knows(thread, server, instance_id), TIMEOUT_S)


async def _start_worker(tiny_model_dir: Callable[..., Path], port: int) -> WorkerServer:
    config = WorkerConfig(role="both", conductor=f"127.0.0.1:{port}", instance_id="w1",
                          profile=False, report_s=0.05)
    engine = EngineConfig(model=str(tiny_model_dir()), dtype="float32", kv_cache_bytes=1 << 20,
                          max_model_len=96, max_num_seqs=4)
    worker = WorkerServer(config, engine)
    await worker.startup()
    return worker


def test_a_worker_registers_with_a_restarted_conductor(
        tiny_model_dir: Callable[..., Path]) -> None:
    port = free_port()
    conductor_thread, worker_thread = LoopThread("conductor"), LoopThread("worker")
    conductor = _conductor(conductor_thread, port)
    worker = worker_thread.run(_start_worker(tiny_model_dir, port), TIMEOUT_S)
    try:
        _wait_known(conductor_thread, conductor, "w1")
        conductor_thread.run(conductor.shutdown(), TIMEOUT_S)  # reports now fail
        conductor = _conductor(conductor_thread, port)  # a new one, knowing nobody
        _wait_known(conductor_thread, conductor, "w1")
    finally:
        worker_thread.run(worker.shutdown(), TIMEOUT_S)
        conductor_thread.run(conductor.shutdown(), TIMEOUT_S)
        worker_thread.stop()
        conductor_thread.stop()


def test_a_failed_report_is_sent_again_rather_than_registering_anew(
        tiny_model_dir: Callable[..., Path]) -> None:
    """Registering anew would drop the worker's requests while the Conductor still counts it
    live (and the Conductor refuses a second registration under a live id)."""
    port = free_port()
    conductor_thread, worker_thread = LoopThread("conductor"), LoopThread("worker")
    conductor = _conductor(conductor_thread, port)
    counts = {"registers": 0, "failed": 0, "reports_after": 0}
    handlers = conductor.dispatcher.handlers
    register, report = handlers[Register], handlers[Report]

    def counting_register(message: Register) -> ReportReply | Awaitable[ReportReply]:
        counts["registers"] += 1
        return register(message)

    def failing_once(message: Report) -> ReportReply:
        if not counts["failed"]:
            counts["failed"] = 1
            raise KvcakeError("a hiccup")
        counts["reports_after"] += 1
        return report(message)

    handlers[Register], handlers[Report] = counting_register, failing_once
    worker = worker_thread.run(_start_worker(tiny_model_dir, port), TIMEOUT_S)
    try:
        wait_until(lambda: conductor_thread.run(_counted(counts, "reports_after"), TIMEOUT_S)
                   >= 5, TIMEOUT_S)
        assert conductor_thread.run(_counted(counts, "registers"), TIMEOUT_S) == 1
    finally:
        worker_thread.run(worker.shutdown(), TIMEOUT_S)
        conductor_thread.run(conductor.shutdown(), TIMEOUT_S)
        worker_thread.stop()
        conductor_thread.stop()


async def _counted(counts: dict[str, int], name: str) -> int:
    return counts[name]
