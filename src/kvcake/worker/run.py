"""Entry point of ``kvcake worker``: serve until SIGINT/SIGTERM."""

from __future__ import annotations

import os

from kvcake.common.aio import run_main, until_signalled
from kvcake.common.errors import InvalidParamsError
from kvcake.common.log import get_logger
from kvcake.engine.config import EngineConfig
from kvcake.worker.config import WorkerConfig, parse_cpus
from kvcake.worker.server import WorkerServer

log = get_logger(__name__)


def run_worker(config: WorkerConfig, engine_config: EngineConfig) -> None:
    cpus = parse_cpus(config.cpus)
    if cpus:
        _check_cpus(cpus)
        os.sched_setaffinity(0, cpus)  # before torch starts its threads
    if config.nice:
        os.nice(config.nice)
    run_main(_main(config, engine_config))


def _check_cpus(cpus: set[int]) -> None:
    usable = os.sched_getaffinity(0)
    missing = sorted(cpus - usable)
    if missing:
        raise InvalidParamsError(f"--cpus: this process may not run on CPU(s) {missing}; "
                                 f"it may use {sorted(usable)}")


async def _main(config: WorkerConfig, engine_config: EngineConfig) -> None:
    server = WorkerServer(config, engine_config)
    try:
        endpoint = await server.startup()
        print(f"kvcake worker {server.instance_id} ({config.role}, {engine_config.model}) "
              f"listening on {endpoint}, conductor {config.conductor}"
              f"{', cpus ' + config.cpus if config.cpus else ''}"
              f"{f', nice {config.nice}' if config.nice else ''}", flush=True)
        await until_signalled()
    finally:
        await server.shutdown()
        log.info("worker %s stopped", server.instance_id)
