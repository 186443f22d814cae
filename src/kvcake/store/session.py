"""A process's standing with the master: registration, mounted segments, heartbeats.

When the master restarts (a new ``master_id``, or a heartbeat answered "unknown client") the
session registers again and remounts its segments by itself, so clients and nodes survive
a master restart without manual steps; ``on_new_master`` lets the owner drop its caches.

With ``master = etcd://HOST:PORT[/PREFIX/]`` the session finds the leader in etcd and
follows a failover: a call that cannot reach the leader waits (up to ``rpc_timeout_s``) for
another leader's record, rejoins it and is sent once more there. A call is never resent to
the master that may have run it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from kvcake.common import codec
from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.etcd import etcd_client
from kvcake.common.log import get_logger
from kvcake.common.rpc import RpcClient
from kvcake.store.config import StoreConfig
from kvcake.store.leader import Layout, LeaderRecord, find_leader, split_etcd_url
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire import store as m

log = get_logger(__name__)
R = TypeVar("R")
_LEADER_POLL_S = 0.1
BEATS_PER_TTL = 4  # a client is declared dead only after this many beats in a row are lost


class LeaderFinder:
    """Where the master is: a fixed ``HOST:PORT``, or the leader named in etcd."""

    def __init__(self, master: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._static = None if master.startswith("etcd://") else LeaderRecord("", master)
        self._address, self._layout = "", Layout()
        if self._static is None:
            self._address, self._layout = split_etcd_url(master)
        self._client: Any = None

    @property
    def follows(self) -> bool:
        return self._static is None

    async def leader(self, not_uid: str | None = None) -> LeaderRecord:
        """The leader (other than term ``not_uid``), waiting up to ``timeout_s`` for one."""
        if self._static is not None:
            return self._static
        deadline = time.monotonic() + self.timeout_s
        while True:
            record = await asyncio.to_thread(self._read)
            if record is not None and record.uid != not_uid:
                return record
            if time.monotonic() > deadline:
                raise KvcakeError(f"no store master leads in etcd {self._address} "
                                  f"{self._layout.prefix}", ErrorCode.RPC_FAIL)
            await asyncio.sleep(_LEADER_POLL_S)

    def _read(self) -> LeaderRecord | None:
        if self._client is None:
            self._client = etcd_client(self._address, self.timeout_s)
        try:
            return find_leader(self._client, self._layout)
        except KvcakeError as exc:
            log.debug("leader lookup failed: %s", exc)
            return None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


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
        self.finder = LeaderFinder(config.master, config.rpc_timeout_s)
        self.rpc = RpcClient(config.master, config.rpc_timeout_s)
        self.leader_uid = ""
        self.master_id = 0
        self.lease_ttl_s = 5.0
        self.client_ttl_s = 0.0  # how long the master waits for a heartbeat (0: not told)
        self.locations = ""  # the master's location table, when this host may read it
        self.arena_bytes = 0  # the most it grants this client to put into without asking
        self.mounts: list[Mount] = []
        self.segment_ids: dict[str, int] = {}
        self._on_new_master = on_new_master
        self._heartbeat: asyncio.Task[None] | None = None
        self._rejoin = asyncio.Lock()
        self._closing = False

    async def start(self, mounts: list[Mount]) -> None:
        self.mounts = mounts
        self._use(await self.finder.leader())
        await self._join()
        self._heartbeat = asyncio.ensure_future(self._beat_forever())

    async def call(self, request: msgspec.Struct, reply_type: type[R]) -> R:
        """One master call; after "unknown client" (master restarted) rejoin and retry once;
        after losing the leader, follow a failover and send it to the new leader once."""
        uid = self.leader_uid
        try:
            return await self._call(request, reply_type)
        except KvcakeError as exc:
            return await self.call_after(exc, uid, request, reply_type)

    async def call_after(self, error: KvcakeError, uid: str, request: msgspec.Struct,
                         reply_type: type[R]) -> R:
        """Recover from ``error``, which ``request`` sent to leader term ``uid`` failed
        with, as :meth:`call` does, then send it again; raises ``error`` when nothing
        recovers from it. (Also for calls sent on other connections to the master.)"""
        if error.code is ErrorCode.UNAVAILABLE_IN_CURRENT_MODE and self.finder.follows:
            return await self._call_when_confirmed(request, reply_type, error)
        if error.code is ErrorCode.RPC_FAIL and self.finder.follows:
            await self._follow(uid, error)
        elif error.code is not ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS:
            raise error
        else:
            await self._rejoin_once()
        return await self._call(request, reply_type)

    async def _call_when_confirmed(self, request: msgspec.Struct, reply_type: type[R],
                                   error: KvcakeError) -> R:
        """The master refused the call unrun: its term is in doubt (cut off from etcd). Send
        it again, to whoever leads, until ``rpc_timeout_s`` has passed."""
        deadline = time.monotonic() + self.config.rpc_timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(_LEADER_POLL_S)
            try:
                record = await self.finder.leader()
                if record.uid != self.leader_uid:
                    async with self._rejoin:
                        self._use(record)
                        await self._join()
                return await self._call(request, reply_type)
            except KvcakeError as exc:
                if exc.code not in (ErrorCode.UNAVAILABLE_IN_CURRENT_MODE, ErrorCode.RPC_FAIL):
                    raise
                error = exc
        raise error

    async def _follow(self, failed_uid: str, error: KvcakeError) -> None:
        """Switch to a leader other than ``failed_uid`` and rejoin it (once for all the
        calls that failed on that term); re-raises ``error`` if none appears in time."""
        async with self._rejoin:
            if self.leader_uid == failed_uid:
                try:
                    record = await self.finder.leader(not_uid=failed_uid)
                except KvcakeError:
                    raise error from None
                log.warning("store master failover: now %s", record.endpoint)
                self._use(record)
                await self._join()

    def _use(self, record: LeaderRecord) -> None:
        if record.endpoint != self.rpc.endpoint:
            self.rpc.close()
            self.rpc = RpcClient(record.endpoint, self.config.rpc_timeout_s)
        self.leader_uid = record.uid

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
        self.client_ttl_s = reply.client_ttl_s
        self.locations = reply.locations if reply.host_id == self.host_id else ""
        self.arena_bytes = reply.arena_bytes if self.locations else 0
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

    def beat_period(self) -> float:
        """``heartbeat_s``, or shorter where the master's TTL asks for it: a beat goes out
        at least :data:`BEATS_PER_TTL` times per TTL, so one late beat never looks like a
        dead client."""
        if self.client_ttl_s <= 0:
            return self.config.heartbeat_s
        return min(self.config.heartbeat_s, self.client_ttl_s / BEATS_PER_TTL)

    async def _beat_forever(self) -> None:
        """A beat every :meth:`beat_period` from the start of the last one (a slow reply
        does not push the next one back)."""
        due = time.monotonic()
        while not self._closing:
            due = max(due + self.beat_period(), time.monotonic())
            await asyncio.sleep(due - time.monotonic())
            uid = self.leader_uid
            try:
                reply = await self._call(m.Heartbeat(self.client_id), m.HeartbeatReply)
                if not reply.known:
                    await self._rejoin_once()
            except KvcakeError as exc:
                log.debug("heartbeat to %s failed: %s", self.rpc.endpoint, exc)
                if exc.code is ErrorCode.RPC_FAIL and self.finder.follows:
                    await self._follow_quietly(uid, exc)
            except Exception:
                log.exception("heartbeat failed")

    async def _follow_quietly(self, uid: str, error: KvcakeError) -> None:
        try:
            await self._follow(uid, error)
        except KvcakeError as exc:
            log.debug("no new leader yet: %s", exc)

    async def release_arena(self) -> None:
        """Give this client's arena back (it puts no more; the master frees the rest)."""
        try:
            await self._call(m.ArenaRelease(self.client_id), m.CodesReply)
        except KvcakeError as exc:
            log.debug("arena not given back: %s", exc)

    async def close(self) -> None:
        # the beats end before the connection closes, so none reopens it behind this
        self._closing = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.wait([self._heartbeat])
        for name, segment_id in self.segment_ids.items():
            try:
                await self._call(m.UnmountSegment(self.client_id, segment_id), m.CodesReply)
            except KvcakeError as exc:
                log.debug("unmount of %s failed: %s", name, exc)
        self.rpc.close()
        self.finder.close()

