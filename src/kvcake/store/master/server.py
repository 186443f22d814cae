"""The master process: :class:`MasterService` behind an RPC server, a sweep timer, the
disk-tier task runner, and ``/metrics``, ``/health`` and Mooncake's admin endpoints over HTTP
(:mod:`kvcake.store.master.admin`).

All state changes happen on the event loop thread, one request at a time, so the service
needs no locks. Disk-tier tasks (offload, promote, drop) are sent to the owning node's
control endpoint; their outcomes come back into the service as ordinary calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from kvcake.common import codec
from kvcake.common.aio import TaskSet
from kvcake.common.auth import cluster_auth
from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.http import HttpReply, Route, Routes, TextHttpServer, text_reply
from kvcake.common.log import get_logger
from kvcake.common.rpc import Dispatcher, RpcClient, RpcServer
from kvcake.store.locations import LocationTable
from kvcake.store.master import admin
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.ends import PendingEnds
from kvcake.store.master.grants import ReplicaGrants
from kvcake.store.master.ha import Persistence
from kvcake.store.master.metrics import render_metrics, summary_line
from kvcake.store.master.owners import SegmentOwners
from kvcake.store.master.replica import Tier
from kvcake.store.master.service import MasterService
from kvcake.store.master.tenants import scoped_key
from kvcake.store.master.tiering import DropDiskTask, OffloadTask, PromoteTask, Task
from kvcake.transfer.grants import GrantMode
from kvcake.transfer.segment import store_registrant
from kvcake.wire import store as m

log = get_logger(__name__)
_SHUTDOWN_S = 5.0  # background tasks get this long to stop

_TIER_WAIT_S = 8.0  # under a client's default rpc_timeout_s: promotions, room, put ends
_RECHECK_S = 0.05
_WAIT_CODES = (ErrorCode.REPLICA_IS_NOT_READY, ErrorCode.NO_AVAILABLE_HANDLE)
# answered only once their changes are in etcd, when the master persists its state
_DURABLE = (m.PutEnd, m.Remove, m.RemoveAll, m.RemoveByRegex, m.ReplicaClear, m.MountSegment,
            m.UnmountSegment)


def _code(result: object) -> int:
    return int(result) if isinstance(result, ErrorCode) else 0


class MasterServer:
    """Lifecycle: ``await startup()`` → serve → ``await shutdown()``."""

    def __init__(self, config: MasterConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.service = MasterService(config, clock)
        self._http = (TextHttpServer(self._http_routes(), config.host, config.metrics_port)
                      if config.metrics_port >= 0 else None)
        self._requests: dict[str, int] = {}
        self._nodes: dict[str, RpcClient] = {}
        self._grants = ReplicaGrants()  # nodes' grant keys: signed handles, with a token
        self._auth = cluster_auth()
        self._owners = SegmentOwners(self._auth)  # same-host nodes' pidfds
        self._task_done = asyncio.Event()
        self._ends = PendingEnds(self.service.objects, self._scoped, _TIER_WAIT_S)
        self._background = TaskSet()
        self._dispatch = Dispatcher(m.MasterRequest, {
            m.RegisterClient: self._register, m.Heartbeat: self._heartbeat,
            m.MountSegment: self._mount, m.UnmountSegment: self._unmount,
            m.PutStart: self._put_start, m.PutEnd: self._put_end, m.PutRevoke: self._put_revoke,
            m.GetReplicas: self._ends.guard(self._get_replicas),
            m.Exist: self._ends.guard(self._exist), m.Remove: self._ends.guard(self._remove),
            m.Touch: self._touch, m.ArenaGrant: self._arena, m.ArenaRelease: self._release,
            m.RemoveAll: self._remove_all, m.RemoveByRegex: self._remove_by_regex,
            m.QueryReplicas: self._ends.guard(self._query_replicas),
            m.ReplicaClear: self._replica_clear,
            m.DescribeSegments: self._describe,
            m.GetStats: lambda _: self.service.stats(),
            m.CheckIntegrity: self._check_integrity,
        }, admit=self._admit, settle=self._settle)
        self._rpc = RpcServer(self._dispatch, config.host, config.port,
                              poll_s=config.poll_us / 1e6)
        self.endpoint = ""
        self.metrics_endpoint = ""
        self.persistence: Persistence | None = None  # set before startup by an HA leader
        self._puts_open_at = 0.0  # loop time; an HA leader fences puts after taking over

    def persist_with(self, persistence: Persistence, put_fence_s: float) -> None:
        """Before startup: flush changes with ``persistence``; hold puts ``put_fence_s``;
        serve only while the election confirms this master's term."""
        self.persistence = persistence
        self._puts_open_at = asyncio.get_running_loop().time() + put_fence_s

    async def startup(self) -> str:
        if self.persistence is None and self.config.location_slots \
                and not self._auth.enabled:
            self._publish_locations()
        self.endpoint = await self._rpc.startup()
        if self._http is not None:
            self.metrics_endpoint = await self._http.startup()
        self._background.spawn(self._sweep_forever())
        if self.config.summary_s:
            self._background.spawn(self._summarise_forever())
        return self.endpoint

    def _publish_locations(self) -> None:
        """Publish where objects lie for the clients of this host, where shared memory
        allows (:mod:`kvcake.store.locations`); without it, they ask as everyone else. Not
        with a cluster token: any process of this user could write the file
        (docs/security.md)."""
        try:
            table = LocationTable(self.config.location_slots)
        except OSError as exc:
            log.warning("no location table (%s): same-host reads will ask the master", exc)
            return
        self.service.table.publish(table)

    async def shutdown(self) -> None:
        await self._background.cancel(_SHUTDOWN_S)
        await self._rpc.shutdown()
        if self._http is not None:
            await self._http.shutdown()
        for client in self._nodes.values():
            client.close()
        self._owners.close()
        self.service.arenas.close()
        table, self.service.table.published = self.service.table.published, None
        if table is not None:
            table.close()

    def metrics_text(self) -> str:
        return render_metrics(self.service.stats(), self.service.counters, self._requests)

    @property
    def role(self) -> admin.Role:
        return admin.Role.SINGLE if self.persistence is None else admin.Role.LEADER

    def serving(self) -> bool:
        """Whether requests are served: always, unless an HA leader's term is unconfirmed."""
        return self.persistence is None or self.persistence.election.confirmed()

    # ----- HTTP
    def _http_routes(self) -> Routes:
        service = self.service
        reads: dict[str, Route] = {
            "/query_key": lambda query: admin.query_key(service, query),
            "/batch_query_keys": lambda query: admin.batch_query_keys(service, query),
            "/get_all_keys": lambda _: admin.all_keys(service),
            "/get_all_segments": lambda _: admin.all_segments(service),
        }
        return {**{path: self._while_serving(route) for path, route in reads.items()},
                "/metrics": self._current(lambda _: text_reply(self.metrics_text())),
                "/metrics/summary": self._current(
                    lambda _: admin.metrics_summary(service, self.role)),
                "/health": lambda _: admin.health(self.role, self.serving())}

    def _while_serving(self, route: Route) -> Route:
        def guarded(query: str) -> HttpReply:
            return self._current(route)(query) if self.serving() else \
                admin.unavailable(self.role)
        return guarded

    def _current(self, route: Route) -> Route:
        """``route``, answered with every put that returned placed (arenas)."""
        def current(query: str) -> HttpReply:
            self.service.arenas.drain()
            self.service.table.publish_changed()
            return route(query)
        return current

    # ----- dispatch
    def _admit(self, request: m.MasterRequest) -> None:
        """Before any handler: only a confirmed leader serves; count; place the puts
        clients recorded in their rings; drop dead owners."""
        if not self.serving():
            raise _not_leading()
        name = type(request).__name__
        self._requests[name] = self._requests.get(name, 0) + 1
        self.service.arenas.drain()  # puts that returned come first
        self._drop_dead_owners()

    def _settle(self, request: m.MasterRequest) -> Awaitable[None] | None:
        """Once a reply is ready: start the node tasks it queued; an HA leader's changes
        reach etcd before a durable request's reply leaves; what changed is published. A
        leader whose term ended while the call waited (for room, for a promotion) answers
        nothing of it: a new leader may have handed that memory out."""
        if not self.serving():
            raise _not_leading()
        self._run_tasks()
        self.service.table.publish_changed()
        if self.persistence is not None and isinstance(request, _DURABLE) \
                and self.service.changes:
            return self.persistence.durable()
        return None

    def _drop_dead_owners(self) -> None:
        """Same-host nodes that exited are dropped before any call can use their pages."""
        for client_id, pid in self._owners.dead():
            log.warning("client %s: its process (pid %d) exited; its segments are dropped",
                        client_id, pid)
            self.service.drop_client(client_id)

    def _register(self, request: m.RegisterClient) -> m.RegisterReply:
        self.service.register_client(request.client_id, request.host_id, request.tenant,
                                     request.tenant_token)
        log.info("client %s registered (host %s, tenant %s)", request.client_id,
                 request.host_id, request.tenant)
        table = self.service.table.published
        if table is None:
            return m.RegisterReply(self.service.master_id, self.config.lease_ttl_s,
                                   self.config.client_ttl_s)
        return m.RegisterReply(self.service.master_id, self.config.lease_ttl_s,
                               self.config.client_ttl_s, table.path, table.host_id,
                               self.config.arena_bytes)

    def _heartbeat(self, request: m.Heartbeat) -> m.HeartbeatReply:
        return m.HeartbeatReply(self.service.heartbeat(request.client_id))

    def _mount(self, request: m.MountSegment) -> m.MountReply | Awaitable[m.MountReply]:
        """The segment is published as the mounting client's; on our host its owner must
        prove that first (:mod:`kvcake.store.master.owners`)."""
        descriptor = msgspec.structs.replace(request.descriptor,
                                             registrant=store_registrant(request.client_id))
        request = msgspec.structs.replace(request, descriptor=descriptor)
        if self._owners.must_verify(descriptor):
            return self._mount_proven(request)
        return self._mount_now(request)

    async def _mount_proven(self, request: m.MountSegment) -> m.MountReply:
        self.service.registry.client(request.client_id)  # unknown clients prove nothing
        await self._owners.verify(request.client_id, request.descriptor)
        return self._mount_now(request)

    def _mount_now(self, request: m.MountSegment) -> m.MountReply:
        try:
            segment_id = self.service.mount_segment(request.client_id, request.descriptor,
                                                    request.disk_capacity,
                                                    request.control_endpoint)
        except KvcakeError as exc:
            if exc.code is ErrorCode.SEGMENT_ALREADY_EXISTS:
                self._relearn_grant_key(request)
            raise
        self._grants.learn(segment_id, request.descriptor.name, request.grant_key)
        log.info("segment %s (%d bytes) mounted by %s", request.descriptor.name,
                 request.descriptor.size, request.client_id)
        return m.MountReply(segment_id)

    def _relearn_grant_key(self, request: m.MountSegment) -> None:
        """Its owner remounting a segment we already hold (restored from the journal)."""
        for segment in self.service.registry.segments.values():
            if segment.name == request.descriptor.name and segment.client_id == \
                    request.client_id:
                self._grants.learn(segment.segment_id, segment.name, request.grant_key)

    def _unmount(self, request: m.UnmountSegment) -> m.CodesReply:
        self.service.unmount_segment(request.client_id, request.segment_id)
        self._grants.forget(request.segment_id)
        return m.CodesReply([0])

    def _put_start(self, request: m.PutStart) -> Any:
        # a client this master does not know (it restarted, or failed over to a journal)
        # fails the whole call, so that the client rejoins and sends it again
        self.service.registry.client(request.client_id)
        self.service.tenant_of(request.client_id)
        if len(request.keys) != len(request.sizes):
            raise KvcakeError(f"{len(request.keys)} keys but {len(request.sizes)} sizes",
                              ErrorCode.INVALID_PARAMS)
        groups = request.config.group_ids
        if groups and len(groups) != len(request.keys):
            raise KvcakeError(f"{len(request.keys)} keys but {len(groups)} group_ids",
                              ErrorCode.INVALID_PARAMS)
        if asyncio.get_running_loop().time() < self._puts_open_at:
            return self._put_start_later(request)
        reply = self._put_start_now(request)
        if ErrorCode.NO_AVAILABLE_HANDLE in reply.codes and self._room_coming():
            return self._put_start_with_room(request, reply)
        if self._leans_on_others(request, reply):
            return self._when_durable(reply)
        return self._pipelined(request, reply)

    def _leans_on_others(self, request: m.PutStart, reply: m.PutStartReply) -> bool:
        """An HA leader's "already there" counts as stored for the writer: it leaves once
        the object it names is in etcd, where that object's put ended since the last flush
        or in the flush under way."""
        if self.persistence is None:
            return False
        keys = self._scoped(request.client_id, request.keys)
        return any(code == ErrorCode.OBJECT_ALREADY_EXISTS and self.persistence.pending(key)
                   for key, code in zip(keys, reply.codes, strict=False))

    async def _when_durable(self, reply: m.PutStartReply) -> m.PutStartReply:
        assert self.persistence is not None
        await self.persistence.durable()
        return reply

    def _pipelined(self, request: m.PutStart, reply: m.PutStartReply) -> m.PutStartReply:
        """``reply``, letting the writer pipeline its ``PutEnd`` where it asked to and this
        master keeps no journal (:mod:`kvcake.store.master.ends`)."""
        if not request.pipeline_end or self.persistence is not None:
            return reply
        self._ends.started(request.client_id, [key for key, code in zip(
            request.keys, reply.codes, strict=True) if code == 0])
        return msgspec.structs.replace(reply, pipeline_end=True)

    async def _put_start_later(self, request: m.PutStart) -> m.PutStartReply:
        """After the fence."""
        await asyncio.sleep(self._puts_open_at - asyncio.get_running_loop().time())
        return await self._put_start_with_room(request, self._put_start_now(request))

    def _room_coming(self) -> bool:
        """Whether memory is on its way back: removals' memory waiting for their flush (with
        persistence) or held for a reader's lease, or offloads to a disk in flight."""
        return self._frees_pending() or self.service.tiering.offloading \
            or bool(self.service.table.retired)

    def _frees_pending(self) -> bool:
        return self.service.changes is not None and bool(self.service.changes.frees)

    async def _put_start_with_room(self, request: m.PutStart,
                                   reply: m.PutStartReply) -> m.PutStartReply:
        """Try the keys refused for room again as memory comes back, for at most
        ``_TIER_WAIT_S``; the keys already started keep their answers. What was on its way
        may have landed before this runs: then the keys are tried once more, at once."""
        codes, replicas = list(reply.codes), list(reply.replicas)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _TIER_WAIT_S
        refused = [i for i, code in enumerate(codes) if code == ErrorCode.NO_AVAILABLE_HANDLE]
        coming = True
        while refused and coming and loop.time() < deadline:
            coming = self._room_coming()
            if coming and self.persistence is not None and self._frees_pending():
                await self.persistence.durable()
            elif coming:
                with contextlib.suppress(TimeoutError):  # an offload landed, or a recheck
                    await asyncio.wait_for(self._task_done.wait(),
                                           min(deadline - loop.time(), _RECHECK_S))
            for i in refused:
                codes[i], replicas[i] = self._put_start_key(request, i)
            refused = [i for i in refused if codes[i] == ErrorCode.NO_AVAILABLE_HANDLE]
        reply = m.PutStartReply(codes, replicas)
        if self._leans_on_others(request, reply):
            return await self._when_durable(reply)
        return self._pipelined(request, reply)

    def _put_start_now(self, request: m.PutStart) -> m.PutStartReply:
        answers = [self._put_start_key(request, i) for i in range(len(request.keys))]
        return m.PutStartReply([code for code, _ in answers], [handles for _, handles in answers])

    def _put_start_key(self, request: m.PutStart, index: int) -> tuple[int, list[Any]]:
        """Key ``index`` of ``request`` started: its code, and its signed handles (if any)."""
        size = request.sizes[index]
        group = request.config.group_ids[index] if request.config.group_ids else None
        result = _per_key(self.service.put_start, request.client_id, request.keys[index], size,
                          request.config, group, request.upsert)
        handles = self._grants.sign(result, size, GrantMode.WRITE, self.config.put_timeout_s) \
            if isinstance(result, list) else []
        return _code(result), handles

    def _put_end(self, request: m.PutEnd) -> m.CodesReply:
        reply = m.CodesReply([int(self.service.put_end(request.client_id, k))
                              for k in request.keys])
        self._ends.ended(request.client_id, request.keys)
        return reply

    def _put_revoke(self, request: m.PutRevoke) -> m.CodesReply:
        reply = m.CodesReply([int(self.service.put_revoke(request.client_id, k))
                              for k in request.keys])
        self._ends.ended(request.client_id, request.keys)
        return reply

    def _scoped(self, client_id: str, keys: list[str]) -> list[str]:
        """``keys`` in the tenant ``client_id``'s calls act in (none where such a call is
        refused anyway: its handler says why)."""
        try:
            tenant = self.service.tenant_of(client_id)
        except KvcakeError:
            return []
        return [scoped_key(tenant, key) for key in keys]

    def _touch(self, request: m.Touch) -> m.CodesReply:
        tenant = self.service.tenant_of(request.client_id)
        for key in request.keys:
            _per_key(self.service.touch, key, tenant, request.read)
        return m.CodesReply([0] * len(request.keys))

    def _arena(self, request: m.ArenaGrant) -> m.ArenaReply:
        tenant = self.service.tenant_of(request.client_id)
        granted = self.service.arenas.grant(request.client_id, tenant)
        if isinstance(granted, ErrorCode):
            return m.ArenaReply(int(granted))
        arena, ring = granted
        return m.ArenaReply(0, arena.segment_id, arena.cursor, arena.end - arena.cursor, ring,
                            self.config.max_key_bytes)

    def _release(self, request: m.ArenaRelease) -> m.CodesReply:
        self.service.registry.client(request.client_id)
        self.service.arenas.release(request.client_id)
        return m.CodesReply([0])

    def _get_replicas(self, request: m.GetReplicas) -> Any:
        tenant = self.service.tenant_of(request.client_id)
        results = [self._get_one(key, tenant) for key in request.keys]
        self._run_tasks()  # starts the promotions just queued
        if any(r in _WAIT_CODES and self._on_disk(k, tenant)
               for k, r in zip(request.keys, results, strict=True)):
            return self._get_after_disk(request.keys, results, tenant)
        return self._get_reply(request.keys, tenant, results)

    def _get_one(self, key: str, tenant: str) -> Any:
        return _per_key(self.service.get_replicas, key, tenant)

    def _on_disk(self, key: str, tenant: str) -> bool:
        obj = self.service.objects.get(scoped_key(tenant, key))
        return obj is not None and any(r.tier is Tier.DISK for r in obj.replicas)

    async def _get_after_disk(self, keys: list[str], results: list[Any],
                              tenant: str) -> m.GetReplicasReply:
        """Keys only on disk: wait for their promotion (or for offloads to make room for
        it), then answer; bounded by ``_TIER_WAIT_S``."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            for i, result in enumerate(results):  # found: leased again, as they are now
                if isinstance(result, tuple):
                    results[i] = _per_key(self.service.replicas_again, keys[i], tenant)
            waiting = [i for i, r in enumerate(results)
                       if r in _WAIT_CODES and self._on_disk(keys[i], tenant)]
            left = start + _TIER_WAIT_S - loop.time()
            if not waiting or left <= 0:
                break
            with contextlib.suppress(TimeoutError):  # a task ended, or room freed silently
                await asyncio.wait_for(self._task_done.wait(), min(left, _RECHECK_S))
            for i in waiting:
                results[i] = self._get_one(keys[i], tenant)
            self._run_tasks()
        return self._get_reply(keys, tenant, results, asyncio.get_running_loop().time() - start)

    def _get_reply(self, keys: list[str], tenant: str, results: list[Any],
                   waited_s: float = 0.0) -> m.GetReplicasReply:
        found = [r if isinstance(r, tuple) else (0, []) for r in results]
        ttl_s = self.config.lease_ttl_s
        return m.GetReplicasReply(
            ttl_s, [_code(r) for r in results], [size for size, _ in found],
            [self._grants.sign(handles, size, GrantMode.READ, ttl_s) for size, handles in found],
            waited_s, [self.service.object_id(key, tenant) if isinstance(r, tuple) and not waited_s
                       else 0 for key, r in zip(keys, results, strict=True)])

    def _exist(self, request: m.Exist) -> m.CodesReply:
        tenant = self.service.tenant_of(request.client_id)
        return m.CodesReply([_exist_code(self.service, k, tenant) for k in request.keys])

    def _remove(self, request: m.Remove) -> m.CodesReply:
        tenant = self.service.remover_tenant(request.client_id)
        return m.CodesReply([_code(_per_key(self.service.remove, key, request.force, tenant))
                             for key in request.keys])

    def _remove_all(self, request: m.RemoveAll) -> m.CountReply:
        tenant = self.service.remover_tenant(request.client_id)
        return m.CountReply(self.service.remove_all(request.force, tenant))

    def _remove_by_regex(self, request: m.RemoveByRegex) -> m.CountReply:
        tenant = self.service.remover_tenant(request.client_id)
        return m.CountReply(self.service.remove_by_regex(request.pattern, request.force, tenant))

    def _query_replicas(self, request: m.QueryReplicas) -> m.QueryReplicasReply:
        tenant = self.service.tenant_of(request.client_id)
        results = [_per_key(self.service.query_replicas, key, tenant) for key in request.keys]
        found = [r if isinstance(r, tuple) else (0, []) for r in results]
        return m.QueryReplicasReply([_code(r) for r in results], [size for size, _ in found],
                                    [infos for _, infos in found])

    def _replica_clear(self, request: m.ReplicaClear) -> m.KeysReply:
        self.service.remover_tenant(request.client_id)  # a caller that may remove
        cleared = [key for key in request.keys
                   if _per_key(self.service.replica_clear, request.client_id, key,
                               request.segment_name) is True]
        return m.KeysReply(cleared)

    def _check_integrity(self, _: m.CheckIntegrity) -> m.IntegrityReply:
        try:
            self.service.check_integrity()
        except AssertionError as exc:
            return m.IntegrityReply(False, str(exc) or "an integrity check failed")
        return m.IntegrityReply(True)

    def _describe(self, request: m.DescribeSegments) -> m.DescribeSegmentsReply:
        ids = (list(self.service.registry.segments)[:m.MAX_SEGMENT_IDS] if request.every
               else request.segment_ids)
        return m.DescribeSegmentsReply(self.service.describe(ids))

    # ----- background work
    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        deferred = False
        while True:
            due = loop.time() + self.config.tick_s
            await asyncio.sleep(self.config.tick_s)
            self.service.arenas.drain()
            self._drop_dead_owners()
            # woken a tick late, this master stood still: the heartbeats sent meanwhile
            # wait unread, so silence is judged at the next sweep, once they are read (only
            # one sweep defers: a master late at every sweep still declares the dead dead)
            deferred = not deferred and loop.time() - due >= self.config.tick_s
            self.service.tick(expire=not deferred)
            self._ends.tidy()
            self._run_tasks()
            self.service.table.publish_changed()

    async def _summarise_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.summary_s)
            log.info("store: %s", summary_line(self.service.stats(), self.service.counters))

    def _run_tasks(self) -> None:
        tasks = self.service.drain_tasks()
        if tasks and self.persistence is not None:
            self._background.spawn(self._run_when_durable(tasks, self.persistence.durable()))
            return
        for task in tasks:
            self._background.spawn(self._run_task(task))

    async def _run_when_durable(self, tasks: list[Task], durable: Awaitable[None]) -> None:
        """An HA leader's disk tasks wait until the change that queued them is in etcd: a
        file dropped before then, its leader gone before the flush, would leave the next
        leader's table naming a file that no longer exists. A term that ends first runs
        none of them (the next leader decides afresh)."""
        try:
            await durable
        except KvcakeError as exc:
            log.info("%d disk task(s) not run: %s", len(tasks), exc)
            return
        for task in tasks:
            self._background.spawn(self._run_task(task))

    async def _run_task(self, task: Task) -> None:
        segment = self.service.registry.segments.get(task.segment_id)
        ok = False
        if segment is not None and segment.control_endpoint:
            ok = await self._call_node(segment.control_endpoint, task)
        if isinstance(task, OffloadTask):
            self.service.offload_done(task, ok)
        elif isinstance(task, PromoteTask):
            self.service.promote_done(task, ok)
        self._task_done.set()  # wakes readers waiting on the disk tier
        self._task_done = asyncio.Event()
        self._run_tasks()
        self.service.table.publish_changed()

    async def _call_node(self, endpoint: str, task: Task) -> bool:
        client = self._nodes.get(endpoint)
        if client is None:
            client = self._nodes[endpoint] = RpcClient(endpoint, self.config.put_timeout_s)
        request: m.NodeRequest
        if isinstance(task, DropDiskTask):
            request = m.DropDiskRequest(task.key)
        elif isinstance(task, OffloadTask):
            request = m.OffloadRequest(task.key, task.offset, task.size)
        else:
            request = m.PromoteRequest(task.key, task.offset, task.size)
        try:
            reply = codec.decode(await client.call(codec.encode(request)), m.CodesReply)
        except KvcakeError as exc:
            log.warning("disk task %s on %s failed: %s", type(task).__name__, endpoint, exc)
            return False
        return reply.codes == [0]


def _per_key(action: Callable[..., Any], *args: Any) -> Any:
    """Run one key's action; a caller fault becomes that key's code, not the batch's."""
    try:
        return action(*args)
    except KvcakeError as exc:
        return exc.code


def _exist_code(service: MasterService, key: str, tenant: str) -> int:
    result = _per_key(service.exist, key, tenant)
    return int(result) if isinstance(result, ErrorCode) else int(bool(result))


def _not_leading() -> KvcakeError:
    return KvcakeError("this master's term as leader is not confirmed; ask the leader "
                       "named in etcd", ErrorCode.UNAVAILABLE_IN_CURRENT_MODE)
