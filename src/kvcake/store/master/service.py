"""The master: objects, replicas, leases, eviction and liveness, with no I/O.

The RPC server (:mod:`kvcake.store.master.server`) calls these methods with the current time and
carries out the disk-tier :data:`Task` s they queue; tests and the simulator drive it
directly with an injected clock. It never touches object bytes.

A put, across processes::

    client                 master (this)                    storage node
    put_start(k, n) ---->  allocate n on r segments
                    <----  replicas (PROCESSING)
    write bytes ------------------------------------------> segment[offset:offset+n]
    put_end(k)      ---->  replicas COMPLETE, key visible, enters eviction order

Per-key outcomes are Mooncake error codes (0 ok), so one bad key in a batch costs only itself.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kvcake.common.config import DEFAULT_TENANT, MasterConfig
from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError, PermissionDeniedError
from kvcake.store.master.eviction import make_eviction_policy
from kvcake.store.master.journal import ChangeSet
from kvcake.store.master.placement import PlacementRequest, make_placement_policy
from kvcake.store.master.replica import Replica, ReplicaState, StoredObject, Tier
from kvcake.store.master.segments import MountedSegment, SegmentRegistry
from kvcake.store.master.tenants import (
    TenantLedger,
    check_user_key,
    scoped_key,
    tenant_of_key,
    tenant_stats,
    usage_by_tenant,
)
from kvcake.store.messages import ReplicaHandle, ReplicateConfig, Stats
from kvcake.transfer.segment import SegmentDescriptor

MAX_REPLICAS = 16


@dataclass(frozen=True)
class OffloadTask:
    """Node copies ``segment[offset:offset+size]`` into its disk file for ``key``."""

    key: str
    segment_id: int
    offset: int
    size: int
    object_id: int = field(default=0, compare=False)  # which put of ``key`` it concerns


@dataclass(frozen=True)
class PromoteTask:
    """Node reads its disk file for ``key`` into ``segment[offset:offset+size]``."""

    key: str
    segment_id: int
    offset: int
    size: int
    object_id: int = field(default=0, compare=False)


@dataclass(frozen=True)
class DropDiskTask:
    key: str
    segment_id: int


Task = OffloadTask | PromoteTask | DropDiskTask


class MasterService:
    """State and decisions of the store master; see the module docstring."""

    def __init__(self, config: MasterConfig, clock: Callable[[], float],
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random(config.seed or None)
        self.master_id = self.rng.getrandbits(48)
        self.registry = SegmentRegistry(self.rng)
        self.objects: dict[str, StoredObject] = {}
        self.eviction = make_eviction_policy(config.eviction)
        self.placement = make_placement_policy(config.placement, self.rng)
        self.tasks: list[Task] = []
        self._object_ids = itertools.count(1)
        self.changes: ChangeSet | None = None  # set by a master that persists its state
        self._offloading_bytes = 0  # memory that offloads in flight will free
        self.tenants = TenantLedger(config.default_tenant_quota_bytes, config.tenants)
        self.counters: dict[str, int] = dict.fromkeys(
            ("evicted", "offloaded", "promoted", "hits", "misses", "reclaimed_puts",
             "dead_clients"), 0)

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
        if self.changes is not None:
            self.changes.segments.add(segment_id)
        return segment_id

    def unmount_segment(self, client_id: str, segment_id: int) -> None:
        segment = self.registry.segments.get(segment_id)
        if segment is None or segment.client_id != client_id:
            raise KvcakeError(f"client {client_id!r} has no segment {segment_id}",
                              ErrorCode.SEGMENT_NOT_FOUND)
        self._drop_segment(segment)

    def describe(self, segment_ids: list[int]) -> list[SegmentDescriptor | None]:
        found = (self.registry.segments.get(i) for i in segment_ids)
        return [s.descriptor if s is not None else None for s in found]

    # ----- puts
    def put_start(self, client_id: str, key: str, size: int,
                  config: ReplicateConfig) -> list[ReplicaHandle] | ErrorCode:
        """Reserve space for ``key``; handles to write to, or a code (``OBJECT_ALREADY_EXISTS``
        means the key is there already and nothing needs writing). ``NO_AVAILABLE_HANDLE``
        also when the put would take the caller's tenant past its quota even after
        evicting the tenant's own objects (see :meth:`_fit_quota`)."""
        self.registry.client(client_id)
        tenant = self.tenant_of(client_id)
        self._check_put(key, size, config)
        key = scoped_key(tenant, key)
        if key in self.objects:
            return ErrorCode.OBJECT_ALREADY_EXISTS
        copies = min(config.replica_num, len(self.registry.segments))
        if not self._fit_quota(tenant, size * copies):
            return ErrorCode.NO_AVAILABLE_HANDLE
        request = PlacementRequest(size, config.replica_num, client_id, config.preferred_segment)
        chosen = self.placement.choose(request, list(self.registry.segments.values()))
        if not chosen:
            self._evict(self.clock(), need=size)
            chosen = self.placement.choose(request, list(self.registry.segments.values()))
        if not chosen:
            return ErrorCode.NO_AVAILABLE_HANDLE
        return self._create(client_id, key, size, config, chosen)

    def _create(self, client_id: str, key: str, size: int, config: ReplicateConfig,
                chosen: list[int]) -> list[ReplicaHandle]:
        now = self.clock()
        replicas = []
        for segment_id in chosen:
            segment = self.registry.segments[segment_id]
            offset = segment.allocator.allocate(size)
            assert offset is not None, "placement chose a segment without room"
            replica = Replica(segment_id, offset, size)
            replica.move_to(ReplicaState.PROCESSING)  # handed to the writer now
            replicas.append(replica)
            segment.keys.add(key)
        self.tenants.charge(tenant_of_key(key), size * len(replicas))
        soft_ttl = config.soft_pin_ttl_s or self.config.soft_pin_ttl_s
        self.objects[key] = StoredObject(
            key, size, replicas, client_id, now, object_id=self.next_object_id(),
            owner=client_id,
            soft_pin_until=now + soft_ttl if config.with_soft_pin else 0.0,
            hard_pinned=config.with_hard_pin,
        )
        return [ReplicaHandle(r.segment_id, r.offset) for r in replicas]

    def put_end(self, client_id: str, key: str) -> ErrorCode:
        if client_id not in self.registry.clients:
            return ErrorCode.OBJECT_NOT_FOUND  # no put of an unknown client is open
        key = scoped_key(self.tenant_of(client_id), key)
        done = self.objects.get(key)
        if done is not None and done.complete and done.owner == client_id:
            return ErrorCode.OK  # ended before: a retry after a failover
        obj = self._open_put(client_id, key)
        if isinstance(obj, ErrorCode):
            return obj
        for replica in obj.replicas:
            if replica.state is ReplicaState.PROCESSING:
                replica.move_to(ReplicaState.COMPLETE)
        if not obj.readable():  # every segment it was written to died meanwhile
            self._delete(obj)
            return ErrorCode.INVALID_WRITE
        obj.writer = None
        self.eviction.insert(key)
        self._changed(key)
        self._evict_if_needed(self.clock())
        return ErrorCode.OK

    def put_revoke(self, client_id: str, key: str) -> ErrorCode:
        if client_id not in self.registry.clients:
            return ErrorCode.OBJECT_NOT_FOUND
        obj = self._open_put(client_id, scoped_key(self.tenant_of(client_id), key))
        if isinstance(obj, ErrorCode):
            return obj
        self._fail_put(obj)
        return ErrorCode.OK

    def _open_put(self, client_id: str, key: str) -> StoredObject | ErrorCode:
        obj = self.objects.get(key)
        if obj is None:
            return ErrorCode.OBJECT_NOT_FOUND
        if obj.writer != client_id:
            return ErrorCode.INVALID_WRITE  # complete already, or someone else's put
        return obj

    def _check_put(self, key: str, size: int, config: ReplicateConfig) -> None:
        self.check_key(key)
        if not 1 <= config.replica_num <= MAX_REPLICAS:
            raise InvalidParamsError(f"replica_num must be 1..{MAX_REPLICAS}, "
                                     f"got {config.replica_num}")
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
        key = scoped_key(tenant, key)
        obj = self.objects.get(key)
        if obj is None or not obj.complete:
            self.counters["misses"] += 1
            return ErrorCode.OBJECT_NOT_FOUND
        now = self.clock()
        obj.lease_until = now + self.config.lease_ttl_s
        memory = obj.readable(Tier.MEMORY)
        if not memory:
            return self._promote(obj)
        self.counters["hits"] += 1
        self.eviction.touch(key)
        return obj.size, [ReplicaHandle(r.segment_id, r.offset) for r in memory]

    def exist(self, key: str, tenant: str = DEFAULT_TENANT) -> bool:
        self.check_key(key)
        obj = self.objects.get(scoped_key(tenant, key))
        if obj is None or not obj.complete:
            return False
        obj.lease_until = self.clock() + self.config.lease_ttl_s
        return True

    # ----- removal
    def remove(self, key: str, force: bool = False, tenant: str = DEFAULT_TENANT) -> ErrorCode:
        self.check_key(key)
        return self._remove(scoped_key(tenant, key), force)

    def _remove(self, key: str, force: bool) -> ErrorCode:
        obj = self.objects.get(key)
        if obj is None:
            return ErrorCode.OBJECT_NOT_FOUND
        if not force:
            if not obj.complete:
                return ErrorCode.REPLICA_IS_NOT_READY
            if obj.leased(self.clock()) or obj.busy:
                return ErrorCode.OBJECT_HAS_LEASE
        self._delete(obj)
        return ErrorCode.OK

    def remove_all(self, force: bool = False, tenant: str = DEFAULT_TENANT) -> int:
        """Remove every object of ``tenant`` (only its own); how many went."""
        keys = [k for k, o in self.objects.items()
                if tenant_of_key(k) == tenant and (o.complete or force)]
        return sum(self._remove(key, force) is ErrorCode.OK for key in keys)

    # ----- background work
    def tick(self) -> None:
        """Declare silent clients dead, reclaim abandoned puts, evict over the watermark."""
        now = self.clock()
        for client_id in self.registry.expired(now, self.config.client_ttl_s):
            self.drop_client(client_id)
        stale = [o for o in self.objects.values()
                 if not o.complete and now - o.put_started_at > self.config.put_timeout_s]
        for obj in stale:
            self.counters["reclaimed_puts"] += 1
            self._fail_put(obj)
        self._evict_if_needed(now)

    def drop_client(self, client_id: str) -> None:
        record = self.registry.clients.pop(client_id, None)
        if record is None:
            return
        self.counters["dead_clients"] += 1
        for segment_id in list(record.segment_ids):
            self._drop_segment(self.registry.segments[segment_id])
        for obj in [o for o in self.objects.values() if o.writer == client_id]:
            self._fail_put(obj)

    def _drop_segment(self, segment: MountedSegment) -> None:
        """Lose every replica on ``segment``; objects with none left are gone."""
        for key in list(segment.keys):
            obj = self.objects[key]
            for replica in [r for r in obj.replicas if r.segment_id == segment.segment_id]:
                replica.move_to(ReplicaState.FAILED)
                obj.replicas.remove(replica)
                if replica.tier is Tier.MEMORY:  # its allocator goes with the segment
                    self.tenants.charge(tenant_of_key(key), -replica.size)
            self._changed(key)
            if not obj.replicas or (obj.complete and not obj.readable()):
                self._delete(obj)
            elif not obj.readable(Tier.MEMORY):
                self.eviction.discard(key)
        self.registry.unmount(segment.segment_id)
        if self.changes is not None:
            self.changes.segments.add(segment.segment_id)

    def _fail_put(self, obj: StoredObject) -> None:
        for replica in obj.replicas:
            if replica.state is not ReplicaState.FAILED:
                replica.move_to(ReplicaState.FAILED)
        self._delete(obj)

    def _delete(self, obj: StoredObject) -> None:
        """Forget ``obj``: free its memory, drop its disk files."""
        if obj.complete:
            self._changed(obj.key)
        for replica in obj.replicas:
            if replica.state in (ReplicaState.PROCESSING, ReplicaState.COMPLETE):
                replica.move_to(ReplicaState.REMOVED)
            self._release(obj.key, replica)
        del self.objects[obj.key]
        self.eviction.discard(obj.key)

    def _release(self, key: str, replica: Replica) -> None:
        if replica.tier is Tier.MEMORY:
            self.tenants.charge(tenant_of_key(key), -replica.size)
        segment = self.registry.segments.get(replica.segment_id)
        if segment is None:
            return
        if replica.tier is Tier.MEMORY:
            self._free(segment, replica.offset, durable=self.objects[key].complete)
        else:
            segment.disk_used -= replica.size
            self.tasks.append(DropDiskTask(key, segment.segment_id))
        if not any(r.segment_id == segment.segment_id for r in self.objects[key].replicas
                   if r is not replica and r.state is not ReplicaState.REMOVED):
            segment.keys.discard(key)

    def _free(self, segment: MountedSegment, offset: int, durable: bool) -> None:
        """Give memory back; with persistence on, memory a durable record may point at waits
        in ``changes.frees`` until the flush that forgets it (:meth:`release_frees`)."""
        if durable and self.changes is not None:
            self.changes.frees.append((segment.segment_id, offset))
        else:
            segment.allocator.free(offset)

    def release_frees(self, frees: list[tuple[int, int]]) -> None:
        """The records of these ranges are gone from etcd: their memory can be reused."""
        for segment_id, offset in frees:
            segment = self.registry.segments.get(segment_id)
            if segment is not None:  # a dropped segment took its allocator with it
                segment.allocator.free(offset)

    def _changed(self, key: str) -> None:
        if self.changes is not None:
            self.changes.objects.add(key)

    def next_object_id(self) -> int:
        return next(self._object_ids)

    # ----- eviction and the disk tier
    def _evict_if_needed(self, now: float) -> None:
        used, total = self.memory_usage()
        if total and used - self._offloading_bytes > self.config.high_watermark * total:
            self._evict(now, need=0)

    def _evict(self, now: float, need: int) -> None:
        """Free about ``evict_ratio`` of the pool (and at least ``need`` bytes), oldest first,
        never touching leased, busy, hard-pinned or unfinished objects; soft-pinned ones go
        only when nothing else is left.

        Tenants first pay for their own excess: each round takes the objects of tenants
        holding more than their fair share (the pool split evenly among the tenants holding
        memory, capped by each one's quota) for as long as they do, then anyone's. With one
        tenant this is plain oldest-first."""
        total = self.memory_usage()[1]
        target = max(need, int(self.config.evict_ratio * total))
        shares = self.tenants.shares(total)
        freed = 0
        for allow_soft, over_only in ((False, True), (False, False), (True, True), (True, False)):
            for obj in list(self._candidates(now, allow_soft)):
                if freed >= target:
                    return
                if over_only and not self.tenants.over_share(tenant_of_key(obj.key), shares):
                    continue
                freed += obj.size * len(obj.readable(Tier.MEMORY))
                self._evict_one(obj)

    def _fit_quota(self, tenant: str, nbytes: int) -> bool:
        """Make ``nbytes`` more of ``tenant`` fit its quota by evicting the tenant's own
        objects, oldest first, soft-pinned last (never another tenant's). ``False``, having
        evicted nothing, when even all of its evictable objects would not make room."""
        excess = self.tenants.excess(tenant, nbytes)
        if not excess:
            return True
        now = self.clock()
        mine = [o for o in self._candidates(now, True) if tenant_of_key(o.key) == tenant]
        victims, freed = [], 0
        for obj in sorted(mine, key=lambda o: o.soft_pinned(now)):  # stable: order kept
            if freed >= excess:
                break
            victims.append(obj)
            freed += obj.size * len(obj.readable(Tier.MEMORY))
        if freed < excess:
            return False
        for obj in victims:
            self._evict_one(obj)
        return True

    def _candidates(self, now: float, allow_soft: bool) -> Iterator[StoredObject]:
        for key in list(self.eviction):
            obj = self.objects[key]
            if obj.leased(now) or obj.busy or obj.hard_pinned or not obj.complete:
                continue
            if allow_soft or not obj.soft_pinned(now):
                yield obj

    def _evict_one(self, obj: StoredObject) -> None:
        self.counters["evicted"] += 1
        self.tenants.count_eviction(tenant_of_key(obj.key))
        self.eviction.discard(obj.key)
        if obj.readable(Tier.DISK):
            self._drop_memory(obj)
            return
        for replica in obj.readable(Tier.MEMORY):
            segment = self.registry.segments[replica.segment_id]
            if segment.disk_room(obj.size):
                segment.disk_used += obj.size  # reserved until the offload reports back
                self._offloading_bytes += obj.size
                self.tenants.offload_started(obj.object_id, tenant_of_key(obj.key),
                                             obj.size * len(obj.readable(Tier.MEMORY)))
                obj.busy += 1
                self.tasks.append(OffloadTask(obj.key, segment.segment_id, replica.offset,
                                              obj.size, obj.object_id))
                return
        self._delete(obj)

    def _drop_memory(self, obj: StoredObject) -> None:
        self._changed(obj.key)
        for replica in obj.readable(Tier.MEMORY):
            replica.move_to(ReplicaState.REMOVED)
            self._release(obj.key, replica)
            obj.replicas.remove(replica)

    def offload_done(self, task: OffloadTask, ok: bool) -> None:
        """The node finished (or failed) writing ``task.key`` to its disk."""
        self._offloading_bytes -= task.size
        self.tenants.offload_ended(task.object_id)
        obj = self._same_object(task.key, task.object_id)
        segment = self.registry.segments.get(task.segment_id)
        if segment is not None and (obj is None or not ok):
            segment.disk_used -= task.size
            if ok:  # the object was removed meanwhile: its file is garbage
                self.tasks.append(DropDiskTask(task.key, task.segment_id))
        if obj is None:
            return
        obj.busy -= 1
        if not ok or segment is None:
            self._delete(obj)  # it had been chosen for eviction anyway
            return
        disk = Replica(task.segment_id, 0, task.size, Tier.DISK)
        disk.move_to(ReplicaState.PROCESSING)
        disk.move_to(ReplicaState.COMPLETE)
        obj.replicas.append(disk)
        segment.keys.add(task.key)
        self._drop_memory(obj)
        self.counters["offloaded"] += 1

    def _promote(self, obj: StoredObject) -> ErrorCode:
        if obj.busy:
            return ErrorCode.REPLICA_IS_NOT_READY  # a promotion is already on its way
        tenant = tenant_of_key(obj.key)
        self._fit_quota(tenant, obj.size)  # best effort: a read is never refused for quota
        disk = obj.readable(Tier.DISK)[0]
        segment = self.registry.segments[disk.segment_id]
        offset = segment.allocator.allocate(obj.size)
        if offset is None:
            self._evict(self.clock(), need=obj.size)
            offset = segment.allocator.allocate(obj.size)
        if offset is None:
            return ErrorCode.NO_AVAILABLE_HANDLE
        replica = Replica(segment.segment_id, offset, obj.size)
        replica.move_to(ReplicaState.PROCESSING)
        obj.replicas.append(replica)
        self.tenants.charge(tenant, obj.size)
        obj.busy += 1
        self.tasks.append(PromoteTask(obj.key, segment.segment_id, offset, obj.size,
                                      obj.object_id))
        return ErrorCode.REPLICA_IS_NOT_READY

    def _same_object(self, key: str, object_id: int) -> StoredObject | None:
        """The object a task was queued for; ``None`` if it was removed (even if the key was
        put again since)."""
        obj = self.objects.get(key)
        return obj if obj is not None and obj.object_id == object_id else None

    def promote_done(self, task: PromoteTask, ok: bool) -> None:
        obj = self._same_object(task.key, task.object_id)
        if obj is None:
            return
        obj.busy -= 1
        replica = next((r for r in obj.replicas if r.tier is Tier.MEMORY
                        and r.segment_id == task.segment_id and r.offset == task.offset), None)
        if replica is None:
            return  # the segment died meanwhile
        if ok:
            replica.move_to(ReplicaState.COMPLETE)
            self.eviction.insert(task.key)
            self.counters["promoted"] += 1
            self._changed(task.key)
            return
        replica.move_to(ReplicaState.FAILED)
        self._release(task.key, replica)
        obj.replicas.remove(replica)

    def drain_tasks(self) -> list[Task]:
        tasks, self.tasks = self.tasks, []
        return tasks

    # ----- accounting
    def memory_usage(self) -> tuple[int, int]:
        segments = self.registry.segments.values()
        return (sum(s.allocator.used_bytes for s in segments),
                sum(s.allocator.size for s in segments))

    def stats(self) -> Stats:
        used, total = self.memory_usage()
        segments = self.registry.segments.values()
        return Stats(
            num_segments=len(self.registry.segments), num_clients=len(self.registry.clients),
            num_keys=sum(o.complete for o in self.objects.values()),
            num_replicas=sum(len(o.readable()) for o in self.objects.values()),
            used_bytes=used, total_bytes=total,
            disk_used_bytes=sum(s.disk_used for s in segments),
            disk_total_bytes=sum(s.disk_capacity for s in segments),
            evicted=self.counters["evicted"], offloaded=self.counters["offloaded"],
            promoted=self.counters["promoted"],
            tenants=tenant_stats(self.tenants, self.objects,
                                 [c.tenant for c in self.registry.clients.values()]),
        )

    def recount_tenants(self) -> None:
        """Recount every tenant's memory from the objects (after restoring them directly)."""
        self.tenants.recount(usage_by_tenant(self.objects))

    def check_integrity(self) -> None:
        """Assert allocators, reverse indexes and the eviction order agree with the objects."""
        for segment in self.registry.segments.values():
            segment.allocator.check_integrity()
            memory = [r for o in self.objects.values() for r in o.replicas
                      if r.segment_id == segment.segment_id and r.tier is Tier.MEMORY]
            held = sum(i == segment.segment_id for i, _ in self.changes.frees) \
                if self.changes is not None else 0
            assert segment.allocator.num_allocations == len(memory) + held, segment.name
            for key in segment.keys:
                assert any(r.segment_id == segment.segment_id for r in self.objects[key].replicas)
        for key, obj in self.objects.items():
            assert obj.replicas, f"{key} has no replicas"
            in_order = obj.complete and bool(obj.readable(Tier.MEMORY)) and not obj.busy
            assert (key in self.eviction) == in_order or obj.busy, f"eviction order for {key}"
            memory = [r for r in obj.replicas if r.tier is Tier.MEMORY]
            assert len({r.segment_id for r in memory}) == len(memory), f"{key} replicas collide"
        self.tenants.check_integrity(usage_by_tenant(self.objects))
