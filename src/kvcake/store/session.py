"""A process's standing with the master: registration, mounted segments, heartbeats.

When the master restarts (a new ``master_id``, or a heartbeat answered "unknown client") the
session registers again and remounts its segments by itself, so clients and nodes survive
a master restart without manual steps; ``on_new_master`` lets the owner drop its caches.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec

from kvcake.common import codec
from kvcake.common.config import StoreConfig
from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.log import get_logger
from kvcake.common.rpc import RpcClient
from kvcake.store import messages as m
from kvcake.transfer.segment import SegmentDescriptor

log = get_logger(__name__)
R = TypeVar("R")


@dataclass(frozen=True)
class Mount:
    descriptor: SegmentDescriptor
    disk_capacity: int = 0
    control_endpoint: str = ""
    grant_key: bytes = field(default=b"", repr=False)  # for the master alone to sign with


class MasterSession:
    def __init__(self, config: StoreConfig, host_id: str,
                 on_new_master: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.client_id = f"{host_id.rsplit('/', 1)[-1]}-{uuid.uuid4().hex[:12]}"
        self.host_id = host_id
        self.rpc = RpcClient(config.master, config.rpc_timeout_s)
        self.master_id = 0
        self.lease_ttl_s = 5.0
        self.mounts: list[Mount] = []
        self.segment_ids: dict[str, int] = {}
        self._on_new_master = on_new_master
        self._heartbeat: asyncio.Task[None] | None = None
        self._rejoin = asyncio.Lock()

    async def start(self, mounts: list[Mount]) -> None:
        self.mounts = mounts
        await self._join()
        self._heartbeat = asyncio.ensure_future(self._beat_forever())

    async def call(self, request: msgspec.Struct, reply_type: type[R]) -> R:
        """One master call; after "unknown client" (master restarted) rejoin and retry once."""
        try:
            return await self._call(request, reply_type)
        except KvcakeError as exc:
            if exc.code is not ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS:
                raise
        await self._rejoin_once()
        return await self._call(request, reply_type)

    async def _call(self, request: msgspec.Struct, reply_type: type[R]) -> R:
        return codec.decode(await self.rpc.call(codec.encode(request)), reply_type)

    async def _join(self) -> None:
        reply = await self._call(m.RegisterClient(self.client_id, self.host_id,
                                                  self.config.tenant, self.config.tenant_token),
                                 m.RegisterReply)
        if reply.master_id != self.master_id:
            if self.master_id:
                log.warning("master restarted (id %x -> %x); remounting", self.master_id,
                            reply.master_id)
            self.master_id = reply.master_id
            self._on_new_master()
        self.lease_ttl_s = reply.lease_ttl_s
        for mount in self.mounts:
            await self._mount(mount)

    async def _mount(self, mount: Mount) -> None:
        request = m.MountSegment(self.client_id, mount.descriptor, mount.disk_capacity,
                                 mount.control_endpoint, mount.grant_key)
        try:
            reply = await self._call(request, m.MountReply)
        except KvcakeError as exc:
            if exc.code is not ErrorCode.SEGMENT_ALREADY_EXISTS:
                raise
            return  # still mounted from before (we only missed heartbeats)
        self.segment_ids[mount.descriptor.name] = reply.segment_id

    async def _rejoin_once(self) -> None:
        async with self._rejoin:
            await self._join()

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            try:
                reply = await self._call(m.Heartbeat(self.client_id), m.HeartbeatReply)
                if not reply.known:
                    await self._rejoin_once()
            except KvcakeError as exc:
                log.debug("heartbeat to %s failed: %s", self.config.master, exc)
            except Exception:
                log.exception("heartbeat failed")

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for name, segment_id in self.segment_ids.items():
            try:
                await self._call(m.UnmountSegment(self.client_id, segment_id), m.CodesReply)
            except KvcakeError as exc:
                log.debug("unmount of %s failed: %s", name, exc)
        self.rpc.close()

