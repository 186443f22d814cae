"""The master: objects, replicas, leases, eviction and liveness, with no I/O.

The RPC server (:mod:`kvcake.store.master.server`) calls these methods with the current
time and carries out the disk-tier :data:`~kvcake.store.master.tiering.Task` s they queue;
tests and the simulator drive it directly with an injected clock. It never touches object
bytes. :class:`MasterService` answers for clients and tenants and checks every request;
what it asks of the objects is done by two collaborators::

    MasterService --+-- ObjectTable (objects.py): objects, replicas, memory, eviction order
                    +-- Tiering (tiering.py): eviction, offload to disk, promotion back

A put, across processes::

    client                 master (this)                    storage node
    put_start(k, n) ---->  allocate n on r segments
                    <----  replicas (PROCESSING)
    write bytes ------------------------------------------> segment[offset:offset+n]
    put_end(k)      ---->  replicas COMPLETE, key visible, enters eviction order

Per-key outcomes are Mooncake error codes (0 ok), so one bad key in a batch costs only itself.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable

from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError, PermissionDeniedError
from kvcake.store.config import DEFAULT_TENANT
from kvcake.store.master.arenas import Arenas
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.journal import ChangeSet
from kvcake.store.master.objects import ObjectTable, PutTerms
from kvcake.store.master.placement import PlacementRequest, make_placement_policy
from kvcake.store.master.puts import check_config, put_terms
from kvcake.store.master.replica import StoredObject, Tier
from kvcake.store.master.segments import MountedSegment, SegmentRegistry
from kvcake.store.master.tenants import (
    TenantLedger,
    check_user_key,
    scoped_key,
    tenant_of_key,
    tenant_stats,
    usage_by_tenant,
    user_key,
)
from kvcake.store.master.tiering import OffloadTask, PromoteTask, Task, Tiering
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire.store import ReplicaHandle, ReplicaInfo, ReplicateConfig, Stats


class MasterService:
    """State and decisions of the store master; see the module docstring."""

    def __init__(self, config: MasterConfig, clock: Callable[[], float],
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random(config.seed or None)
        self.master_id = self.rng.getrandbits(48)
        self.registry = SegmentRegistry(self.rng)
        self.tenants = TenantLedger(config.default_tenant_quota_bytes, config.tenants)
        self.table = ObjectTable(config, clock, self.registry, self.tenants)
        self.objects = self.table.objects
        self.placement = make_placement_policy(config.placement, self.rng)
        self.counters: dict[str, int] = dict.fromkeys(
            ("evicted", "offloaded", "promoted", "disk_evicted", "hits", "misses",
             "reclaimed_puts", "dead_clients", "arena_puts", "arena_puts_kept"), 0)
        self.tiering = Tiering(self.table, self.counters)
        self.arenas = Arenas(config, self.table, self.tenants, self.tiering, self.check_key)

    @property
    def changes(self) -> ChangeSet | None:
        """What changed since the last flush; ``None`` unless the master persists its state."""
        return self.table.changes

    @changes.setter
    def changes(self, changes: ChangeSet | None) -> None:
        self.table.changes = changes

    # ----- clients and segments
    def register_client(self, client_id: str, host_id: str, tenant: str = DEFAULT_TENANT,
                        token: str = "") -> None:
        """(Re-)register ``client_id`` as ``tenant``: a tenant with a token needs it, and a
        client never changes tenant."""
        self.tenants.admit(tenant, token)
        record = self.registry.clients.get(client_id)
        if record is not None and record.tenant not in ("", tenant):
            raise PermissionDeniedError(f"client {client_id!r} is registered as tenant "
                                        f"{record.tenant!r}, not {tenant!r}")
        self.registry.register(client_id, host_id, self.clock(), tenant)

    def tenant_of(self, client_id: str) -> str:
        """The tenant a call of ``client_id`` acts in; no client id means the default tenant
        (refused when that tenant has a token). Unknown clients must register first."""
        if not client_id:
            if self.tenants.needs_token(DEFAULT_TENANT):
                raise PermissionDeniedError("the default tenant has a token: calls must come "
                                            "from a registered client")
            return DEFAULT_TENANT
        record = self.registry.client(client_id)
        if not record.tenant:  # restored from a journal: it has not named its tenant here
            raise KvcakeError(f"client {client_id!r} must register again",
                              ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
        return record.tenant

    def remover_tenant(self, client_id: str) -> str:
        """The tenant whose objects a remove or remove_all of ``client_id`` may delete. A
        caller with no client id is nobody: it may read the default tenant, never delete
        (``ILLEGAL_CLIENT``); an unknown client must register first."""
        if not client_id:
            raise KvcakeError("remove and remove_all need a registered client (register, "
                              "then send its client_id): a caller without one may only read",
                              ErrorCode.ILLEGAL_CLIENT)
        return self.tenant_of(client_id)

    def heartbeat(self, client_id: str) -> bool:
        return self.registry.heartbeat(client_id, self.clock())

    def mount_segment(self, client_id: str, descriptor: SegmentDescriptor,
                      disk_capacity: int = 0, control_endpoint: str = "") -> int:
        segment_id = self.registry.mount(client_id, descriptor, disk_capacity, control_endpoint)
        self.table.changed_segment(segment_id)
        return segment_id

    def unmount_segment(self, client_id: str, segment_id: int) -> None:
        segment = self.registry.segments.get(segment_id)
        if segment is None or segment.client_id != client_id:
            raise KvcakeError(f"client {client_id!r} has no segment {segment_id}",
                              ErrorCode.SEGMENT_NOT_FOUND)
        self.arenas.drop_segment(segment_id)
        self.table.drop_segment(segment)

    def describe(self, segment_ids: list[int]) -> list[SegmentDescriptor | None]:
        found = (self.registry.segments.get(i) for i in segment_ids)
        return [s.descriptor if s is not None else None for s in found]

    # ----- puts
    def put_start(self, client_id: str, key: str, size: int, config: ReplicateConfig,
                  group: str | None = None, upsert: bool = False
                  ) -> list[ReplicaHandle] | ErrorCode:
        """Reserve space for ``key``; handles to write to, or a code (``OBJECT_ALREADY_EXISTS``
        means the key is there already and nothing needs writing). ``NO_AVAILABLE_HANDLE``
        also when the put would take the caller's tenant past its quota even after
        evicting the tenant's own objects (see :meth:`Tiering.fit_quota`).

        ``group``: the group the object joins (``None``: none given; see :mod:`.groups`).
        ``upsert``: an object already under ``key`` is replaced (see :meth:`_replace`)."""
        self.registry.client(client_id)
        tenant = self.tenant_of(client_id)
        self._check_put(key, size, config)
        key = scoped_key(tenant, key)
        scoped_group = scoped_key(tenant, group) if group else ""
        carried = PutTerms()
        existing = self.objects.get(key)
        if existing is not None:
            if not upsert:
                return ErrorCode.OBJECT_ALREADY_EXISTS
            replaced = self._replace(existing, scoped_group if group is not None else None)
            if isinstance(replaced, ErrorCode):
                return replaced
            carried = replaced
        terms = put_terms(config, carried, scoped_group, self.clock(), self.config.soft_pin_ttl_s)
        return self._allocate(client_id, tenant, key, size, config, terms)

    def _allocate(self, client_id: str, tenant: str, key: str, size: int,
                  config: ReplicateConfig, terms: PutTerms) -> list[ReplicaHandle] | ErrorCode:
        copies = min(config.replica_num, len(self.registry.segments))
        self.table.free_retired(self.clock())  # held memory whose time has come, at once
        if not self.tiering.fit_quota(tenant, size * copies):
            return ErrorCode.NO_AVAILABLE_HANDLE
        request = PlacementRequest(size, config.replica_num, client_id, config.preferred_segment,
                                   self._preferred(client_id, config, terms.group))
        chosen = self.placement.choose(request, list(self.registry.segments.values()))
        if not chosen:
            self.tiering.evict(self.clock(), need=size)
            chosen = self.placement.choose(request, list(self.registry.segments.values()))
        if not chosen:
            return ErrorCode.NO_AVAILABLE_HANDLE
        return self.table.create(client_id, key, size, terms, chosen)

    def _preferred(self, client_id: str, config: ReplicateConfig, group: str) -> tuple[str, ...]:
        """Segment names to try first: the config's, then those the group is on, then (with
        ``prefer_same_host``) those of the writer's host."""
        names = list(config.preferred_segments)
        for key in sorted(self.table.groups.members(group)):
            names += [self.registry.segments[r.segment_id].name
                      for r in self.objects[key].readable(Tier.MEMORY)]
        if config.prefer_same_host:
            host = self.registry.client(client_id).host_id
            names += sorted(s.name for s in self.registry.segments.values()
                            if s.descriptor.host_id == host)
        return tuple(dict.fromkeys(names))

    def _replace(self, obj: StoredObject, group: str | None) -> PutTerms | ErrorCode:
        """Make way for an upsert of ``obj.key``; what the new object carries over. Memory a
        reader may still read (its lease) or a preempted writer may still write (its put
        timeout) is retired until then, never reused early. ``OBJECT_REPLICA_BUSY`` while
        the disk tier moves it; ``INVALID_PARAMS`` for a group other than its own."""
        if obj.busy:
            return ErrorCode.OBJECT_REPLICA_BUSY
        if group is not None and group != obj.group:
            return ErrorCode.INVALID_PARAMS  # group membership is fixed while it lives
        carried = PutTerms(obj.hard_pinned, obj.soft_pin_until, obj.group)
        if obj.complete:
            self.table.delete(obj, hold_until=obj.lease_until)
        else:
            self.table.fail_put(obj, hold_until=self.clock() + self.config.put_timeout_s)
        return carried

    def put_end(self, client_id: str, key: str) -> ErrorCode:
        if client_id not in self.registry.clients:
            return ErrorCode.OBJECT_NOT_FOUND  # no put of an unknown client is open
        key = scoped_key(self.tenant_of(client_id), key)
        done = self.objects.get(key)
        if done is not None and done.complete and done.owner == client_id:
            return ErrorCode.OK  # ended before: a retry after a failover
        code = self.table.complete(client_id, key)
        if code is ErrorCode.OK:
            self.tiering.evict_if_needed(self.clock())
        return code

    def put_revoke(self, client_id: str, key: str) -> ErrorCode:
        if client_id not in self.registry.clients:
            return ErrorCode.OBJECT_NOT_FOUND
        obj = self.table.open_put(client_id, scoped_key(self.tenant_of(client_id), key))
        if isinstance(obj, ErrorCode):
            return obj
        self.table.fail_put(obj)
        return ErrorCode.OK

    def _check_put(self, key: str, size: int, config: ReplicateConfig) -> None:
        self.check_key(key)
        check_config(config)
        if size <= 0:
            raise InvalidParamsError(f"size of {key!r} must be > 0, got {size}")
        largest = self.registry.largest_segment()
        if size > largest:
            raise InvalidParamsError(
                f"object {key!r} of {size} bytes is larger than any mounted segment "
                f"(largest {largest} bytes)")

    def check_key(self, key: str) -> None:
        if not key:
            raise InvalidParamsError("key must not be empty", ErrorCode.INVALID_KEY)
        check_user_key(key)
        if len(key.encode()) > self.config.max_key_bytes:
            raise InvalidParamsError(
                f"key of {len(key.encode())} bytes exceeds max_key_bytes "
                f"{self.config.max_key_bytes}", ErrorCode.INVALID_KEY)

    # ----- reads
    def get_replicas(self, key: str, tenant: str = DEFAULT_TENANT
                     ) -> tuple[int, list[ReplicaHandle]] | ErrorCode:
        """Size and COMPLETE memory replicas of ``key`` of ``tenant``, granting a lease. A key
        only on disk queues a promotion and answers ``REPLICA_IS_NOT_READY`` until it lands."""
        self.check_key(key)
        obj = self.table.lease(scoped_key(tenant, key))
        if obj is None:
            self.counters["misses"] += 1
            return ErrorCode.OBJECT_NOT_FOUND
        self.table.touch(obj.key)
        if not obj.readable(Tier.MEMORY):
            return self.tiering.promote(obj)
        self.counters["hits"] += 1
        return _in_memory(obj)

    def replicas_again(self, key: str, tenant: str = DEFAULT_TENANT
                       ) -> tuple[int, list[ReplicaHandle]] | ErrorCode:
        """:meth:`get_replicas` for a key already counted as read: leased again, with the
        memory replicas it has now (``REPLICA_IS_NOT_READY`` where none is left)."""
        obj = self.table.lease(scoped_key(tenant, key))
        if obj is None:
            return ErrorCode.OBJECT_NOT_FOUND
        return _in_memory(obj) if obj.readable(Tier.MEMORY) else ErrorCode.REPLICA_IS_NOT_READY

    def object_id(self, key: str, tenant: str = DEFAULT_TENANT) -> int:
        """Which put of ``key`` is stored (:attr:`StoredObject.object_id`; 0: none)."""
        obj = self.objects.get(scoped_key(tenant, key))
        return 0 if obj is None else obj.object_id

    def exist(self, key: str, tenant: str = DEFAULT_TENANT) -> bool:
        self.check_key(key)
        return self.table.lease(scoped_key(tenant, key)) is not None

    def touch(self, key: str, tenant: str = DEFAULT_TENANT, read: bool = True) -> None:
        """``key`` was found in the location table: leased (and, ``read``, used) as a get or
        exist through the master would have. A key gone meanwhile is no error."""
        self.check_key(key)
        obj = self.table.lease(scoped_key(tenant, key))
        if obj is not None and read:
            self.table.touch(obj.key)
            self.counters["hits"] += 1

    def query_replicas(self, key: str, tenant: str = DEFAULT_TENANT
                       ) -> tuple[int, list[ReplicaInfo]] | ErrorCode:
        """Size and every readable replica of ``key`` (any tier), granting a lease as a get
        does (Mooncake's ``Query``)."""
        self.check_key(key)
        obj = self.table.lease(scoped_key(tenant, key))
        if obj is None:
            return ErrorCode.OBJECT_NOT_FOUND
        return obj.size, [self._info(r.segment_id, r.tier.value, r.state.value, r.offset,
                                     r.size) for r in obj.readable()]

    def _info(self, segment_id: int, tier: str, state: str, offset: int,
              size: int) -> ReplicaInfo:
        segment = self.registry.segments[segment_id]
        return ReplicaInfo(tier, state, segment.name, segment.descriptor.endpoint, offset, size)

    # ----- removal
    def remove(self, key: str, force: bool = False, tenant: str = DEFAULT_TENANT) -> ErrorCode:
        self.check_key(key)
        return self.table.remove(scoped_key(tenant, key), force)

    def remove_all(self, force: bool = False, tenant: str = DEFAULT_TENANT) -> int:
        """Remove every object of ``tenant`` (only its own); how many went."""
        keys = [k for k, o in self.objects.items()
                if tenant_of_key(k) == tenant and (o.complete or force)]
        return sum(self.table.remove(key, force) is ErrorCode.OK for key in keys)

    def remove_by_regex(self, pattern: str, force: bool = False,
                        tenant: str = DEFAULT_TENANT) -> int:
        """Remove the objects of ``tenant`` whose key ``pattern`` matches anywhere (leased or
        unfinished ones stay, unless ``force``); how many went."""
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise InvalidParamsError(f"bad regex {pattern!r}: {exc}") from None
        keys = [k for k, o in self.objects.items() if tenant_of_key(k) == tenant
                and (o.complete or force) and regex.search(user_key(k))]
        return sum(self.table.remove(key, force) is ErrorCode.OK for key in keys)

    def replica_clear(self, client_id: str, key: str, segment_name: str = "") -> bool:
        """Drop ``client_id``'s own complete object ``key`` whose lease has run out: all its
        replicas, or (``segment_name``) those on segments of that name, the object going
        with its last one. Whether anything was dropped; a missing, foreign, leased, busy
        or unfinished object, or one with nothing on ``segment_name``, is left alone."""
        self.check_key(key)
        obj = self.objects.get(scoped_key(self.tenant_of(client_id), key))
        if obj is None or obj.owner != client_id or not obj.complete or obj.busy \
                or obj.leased(self.clock()):
            return False
        if not segment_name:
            self.table.delete(obj)
            return True
        doomed = [r for r in obj.readable()
                  if self.registry.segments[r.segment_id].name == segment_name]
        for replica in doomed:
            self.table.drop_replica(obj, replica)
        return bool(doomed)

    # ----- background work
    def tick(self, expire: bool = True) -> None:
        """Declare silent clients dead (unless ``expire`` is false), reclaim abandoned puts,
        evict over the watermark."""
        now = self.clock()
        for client_id in self.registry.expired(now, self.config.client_ttl_s) if expire else ():
            self.drop_client(client_id)
        stale = [o for o in self.table.open_puts.values()
                 if now - o.put_started_at > self.config.put_timeout_s]
        for obj in stale:
            self.counters["reclaimed_puts"] += 1
            self.table.fail_put(obj)
        self.table.free_retired(now)
        self.tiering.evict_if_needed(now)

    def drop_client(self, client_id: str) -> None:
        record = self.registry.clients.pop(client_id, None)
        if record is None:
            return
        self.counters["dead_clients"] += 1
        self.arenas.revoke(client_id)
        for segment_id in list(record.segment_ids):
            self.arenas.drop_segment(segment_id)
            self.table.drop_segment(self.registry.segments[segment_id])
        for obj in [o for o in self.table.open_puts.values() if o.writer == client_id]:
            self.table.fail_put(obj)

    def offload_done(self, task: OffloadTask, ok: bool) -> None:
        self.tiering.offload_done(task, ok)

    def promote_done(self, task: PromoteTask, ok: bool) -> None:
        self.tiering.promote_done(task, ok)

    def drain_tasks(self) -> list[Task]:
        tasks, self.table.tasks = self.table.tasks, []
        return tasks

    def release_frees(self, frees: list[tuple[int, int]]) -> None:
        self.table.release_frees(frees)

    def restore(self, segments: Iterable[tuple[MountedSegment, str]],
                objects: Iterable[StoredObject], now: float) -> None:
        """Adopt what a journal held (:func:`kvcake.store.master.journal.restore` rebuilds
        it): segments with their owners' host ids, then complete objects, oldest first.
        Owners count as alive from ``now``: they have ``client_ttl_s`` to rejoin."""
        assert not self.objects and not self.registry.segments, "restore into a used master"
        for segment, host_id in segments:
            self.registry.adopt(segment, host_id, now)
        for obj in objects:
            self.table.adopt(obj)
        self.recount_tenants()

    # ----- accounting
    def memory_usage(self) -> tuple[int, int]:
        return self.registry.memory_usage()

    def stats(self) -> Stats:
        used, total = self.memory_usage()
        held, retired = self.arenas.rest_bytes(), self.table.retired_bytes
        segments = self.registry.segments.values()
        return Stats(
            num_segments=len(self.registry.segments), num_clients=len(self.registry.clients),
            num_keys=len(self.objects) - len(self.table.open_puts),
            num_replicas=self.table.readable_replicas,
            used_bytes=used - held - retired, total_bytes=total, arena_bytes=held,
            retired_bytes=retired,
            disk_used_bytes=sum(s.disk_used for s in segments),
            disk_total_bytes=sum(s.disk_capacity for s in segments),
            evicted=self.counters["evicted"], offloaded=self.counters["offloaded"],
            promoted=self.counters["promoted"], disk_evicted=self.counters["disk_evicted"],
            tenants=tenant_stats(self.tenants, self.table.keys_by_tenant,
                                 [c.tenant for c in self.registry.clients.values()]),
        )

    def recount_tenants(self) -> None:
        """Recount every tenant's memory from the objects (after restoring them directly)."""
        self.tenants.recount(usage_by_tenant(self.objects))

    def check_integrity(self) -> None:
        self.table.check_integrity(self.arenas.held)


def _in_memory(obj: StoredObject) -> tuple[int, list[ReplicaHandle]]:
    """``obj``'s size and its COMPLETE memory replicas, as a reader is handed them."""
    return obj.size, [ReplicaHandle(r.segment_id, r.offset) for r in obj.readable(Tier.MEMORY)]
