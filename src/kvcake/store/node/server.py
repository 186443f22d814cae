"""A storage node's lifecycle, and ``kvcake node``: a process that only contributes memory.

Any store client given ``segment_size`` is a node too (Mooncake's ``global_segment_size``):
:class:`kvcake.store.AsyncStore` starts a :class:`NodeServer` before it joins the master.
"""

from __future__ import annotations

import asyncio

from kvcake.common.aio import run_main
from kvcake.common.config import format_size
from kvcake.common.lifespan import Lifespan
from kvcake.common.rpc import RpcServer
from kvcake.store.config import StoreConfig
from kvcake.store.node.disk import DiskTier, control_channel
from kvcake.store.session import MasterSession, Mount
from kvcake.transfer import TransferEngine
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.segment import store_registrant
from kvcake.wire import store as m


class NodeServer:
    """Lifecycle: ``await startup(engine, client_id)`` → serve → ``await shutdown()``."""

    def __init__(self, config: StoreConfig, host: str) -> None:
        self.config = config
        self.host = host  # of the control endpoint
        self.segment_name = ""
        self.control_endpoint = ""
        self._disk: DiskTier | None = None
        self._control: RpcServer | None = None

    async def startup(self, engine: TransferEngine, client_id: str) -> list[Mount]:
        """Register the segment (none without ``segment_size``), start its disk tier and the
        control server; the mounts to ask the master for, published as ``client_id``'s."""
        if not self.config.segment_size:
            return []
        name = self.config.segment_name or f"pool@{engine.endpoint}"
        segment = await asyncio.to_thread(engine.register_segment, name,
                                          self.config.segment_size)
        self.segment_name = name
        if self.config.disk_dir:
            self._disk = DiskTier(self.config.disk_dir, segment.view,
                                  self.config.disk_capacity)
        info = m.NodeInfoReply(self.config.master, self.config.tenant, name, engine.endpoint)
        self._control = RpcServer(control_channel(self._disk, lambda: info), self.host,
                                  self.config.control_port)
        self.control_endpoint = await self._control.startup()
        registrant = store_registrant(client_id)  # how the master publishes it
        engine.bind(name, registrant)
        descriptor = engine.local_descriptor(name, registrant)
        return [Mount(descriptor, self.config.disk_capacity, self.control_endpoint,
                      engine.grant_key(name))]

    async def shutdown(self) -> None:
        if self._control is not None:
            await self._control.shutdown()
            self._control = None
        if self._disk is not None:
            self._disk.close()
            self._disk = None


def run_node(config: StoreConfig, transfer: TransferConfig, ready_file: str = "") -> None:
    run_main(_node_main(config, transfer, ready_file))


async def _node_main(config: StoreConfig, transfer: TransferConfig, ready_file: str) -> None:
    async with Lifespan("node", ready_file) as life:
        engine = await asyncio.to_thread(TransferEngine, transfer)
        life.on_stop("the transfer engine", lambda: asyncio.to_thread(engine.close))
        node = NodeServer(config, transfer.host)
        life.on_stop("the disk tier", node.shutdown)
        session = MasterSession(config, engine.host_id)
        life.on_stop("the master session", session.close)
        await session.start(await node.startup(engine, session.client_id))
        disk = f", disk tier {format_size(config.disk_capacity)} in {config.disk_dir}" \
            if config.disk_dir else ""
        await life.serve(f"kvcake node: segment {node.segment_name} "
                         f"({format_size(config.segment_size)}) mounted on master "
                         f"{config.master}{disk}",
                         {"transfer": engine.endpoint, "segment": node.segment_name,
                          "control": node.control_endpoint})
