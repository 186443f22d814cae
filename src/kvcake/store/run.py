"""Entry points of ``kvcake master`` and ``kvcake node``: run until SIGINT/SIGTERM."""

from __future__ import annotations

from kvcake.common.aio import run_main, until_signalled
from kvcake.common.config import MasterConfig, StoreConfig, TransferConfig, format_size
from kvcake.common.log import get_logger
from kvcake.store.client import AsyncStore
from kvcake.store.server import MasterServer

log = get_logger(__name__)


def run_master(config: MasterConfig) -> None:
    run_main(_master_main(config))


def run_node(config: StoreConfig, transfer: TransferConfig) -> None:
    run_main(_node_main(config, transfer))


async def _master_main(config: MasterConfig) -> None:
    server = MasterServer(config)
    endpoint = await server.startup()
    metrics = server.metrics_endpoint and f" (metrics http://{server.metrics_endpoint}/metrics)"
    print(f"kvcake master listening on {endpoint}{metrics}", flush=True)
    try:
        await until_signalled()
    finally:
        await server.shutdown()
        log.info("master stopped")


async def _node_main(config: StoreConfig, transfer: TransferConfig) -> None:
    node = AsyncStore(config, transfer)
    await node.setup()
    disk = f", disk tier {format_size(config.disk_capacity)} in {config.disk_dir}" \
        if config.disk_dir else ""
    print(f"kvcake node: segment {node.segment_name} ({format_size(config.segment_size)}) "
          f"mounted on master {config.master}{disk}", flush=True)
    try:
        await until_signalled()
    finally:
        await node.close()
