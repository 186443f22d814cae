"""Entry point of ``kvcake worker``: serve until SIGINT/SIGTERM."""

from __future__ import annotations

import os

from kvcake.common.aio import run_main
from kvcake.common.config import parse_cpus
from kvcake.common.errors import InvalidParamsError, KvcakeError
from kvcake.common.lifespan import Lifespan
from kvcake.engine.config import EngineConfig
from kvcake.worker.config import WorkerConfig
from kvcake.worker.server import WorkerServer


def run_worker(config: WorkerConfig, engine_config: EngineConfig, ready_file: str = "") -> None:
    cpus = parse_cpus(config.cpus)
    if cpus:
        _check_cpus(cpus)
        os.sched_setaffinity(0, cpus)  # before torch starts its threads
    if config.nice:
        os.nice(config.nice)
    run_main(_main(config, engine_config, ready_file))


def _check_cpus(cpus: set[int]) -> None:
    usable = os.sched_getaffinity(0)
    missing = sorted(cpus - usable)
    if missing:
        raise InvalidParamsError(f"--cpus: this process may not run on CPU(s) {missing}; "
                                 f"it may use {sorted(usable)}")


async def _main(config: WorkerConfig, engine_config: EngineConfig, ready_file: str) -> None:
    async with Lifespan("worker", ready_file) as life:
        server = WorkerServer(config, engine_config)
        life.on_stop(f"worker {server.instance_id}", server.shutdown)
        server.on_engine_death(life.stop)
        endpoint = await server.startup()
        await life.serve(f"kvcake worker {server.instance_id} ({config.role}, "
                         f"{engine_config.model}) listening on {endpoint}, conductor "
                         f"{config.conductor}{', cpus ' + config.cpus if config.cpus else ''}"
                         f"{f', nice {config.nice}' if config.nice else ''}", {"rpc": endpoint})
    if server.engine_error is not None:  # after the stop phases: exit with an error
        raise KvcakeError(f"worker {server.instance_id}: its engine failed: "
                          f"{server.engine_error!r}")
