"""What leaves memory, and how: eviction, offload to a node's disk, promotion back. No I/O.

An evicted object goes to the disk tier of a segment holding one of its replicas when that
node has room, made if need be by dropping the disk's own least recently used copies (the
disk order, ``ObjectTable.disk_order``), else it is deleted. The disk tier is the node's to
run: these decisions queue :data:`Task` s in ``ObjectTable.tasks``; the server sends them to
the node's control endpoint and reports each outcome back (:meth:`Tiering.offload_done`,
:meth:`Tiering.promote_done`)::

    memory --evict, disk room--> OffloadTask --ok--> disk replica, memory freed
    memory --evict, disk full--> oldest disk copies dropped (DropDiskTask), then as above
    memory --evict, no room----> deleted
    disk   --get---------------> PromoteTask --ok--> memory replica (the get is retried)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvcake.common.errors import ErrorCode
from kvcake.store.master.replica import Replica, ReplicaState, StoredObject, Tier
from kvcake.store.master.tenants import tenant_of_key

if TYPE_CHECKING:
    from kvcake.store.master.objects import ObjectTable
    from kvcake.store.master.segments import MountedSegment


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


class Tiering:
    """Eviction (watermark, room for a put, tenant quotas) and the disk tier's bookkeeping."""

    def __init__(self, table: ObjectTable, counters: dict[str, int]) -> None:
        self.config = table.config
        self.clock = table.clock
        self.table = table
        self.registry = table.registry
        self.tenants = table.tenants
        self.counters = counters
        self._offloading_bytes = 0  # memory that offloads in flight will free
        self._blocked_until = 0.0  # see evict(): rounds look only at newcomers until then

    # ----- eviction
    def evict_if_needed(self, now: float) -> None:
        used, total = self.registry.memory_usage()
        coming = self._offloading_bytes + self.table.retired_bytes  # held: back soon
        if total and used - coming > self.config.high_watermark * total:
            self.evict(now, need=0)

    def evict(self, now: float, need: int) -> None:
        """Free about ``evict_ratio`` of the pool (and at least ``need`` bytes), less what
        offloads in flight will free, oldest first, never touching leased, busy,
        hard-pinned or unfinished objects; soft-pinned ones go only when nothing else is
        left. A group goes as one (:mod:`.groups`).

        Tenants first pay for their own excess: each round takes the objects of tenants
        holding more than their fair share (the pool split evenly among the tenants holding
        memory, capped by each one's quota) for as long as they do, then anyone's. With one
        tenant this is plain oldest-first.

        A round that frees less than its target has taken everything it could: what it
        passed over stays in memory until a lease it met ends (leases only grow; a pin
        stays; a busy object's task reports back first, which ends this early). Until then
        rounds look only at the objects that joined the eviction order since, so a pool
        held by leases or pins costs one scan of it per lease, not one per put."""
        total = self.registry.memory_usage()[1]
        target = max(need, int(self.config.evict_ratio * total)) - self._offloading_bytes
        blocked = now < self._blocked_until
        order = self.table.eviction
        passed = _Passed(now + self.config.lease_ttl_s)
        freed = self._round(now, order.since_mark() if blocked else list(order), target,
                            self.tenants.shares(total), passed)
        if freed >= target and not blocked:
            order.unmark()
        elif freed < target:
            self._blocked_until = min(passed.until, self._blocked_until) if blocked \
                else passed.until
            order.mark()

    def _round(self, now: float, keys: list[str], target: int, shares: Mapping[str, int],
               passed: _Passed) -> int:
        """Evict from ``keys`` (oldest first) until ``target`` bytes are freed; how many."""
        freed = 0
        for allow_soft, over_only in ((False, True), (False, False), (True, True), (True, False)):
            for unit in self._units(now, allow_soft, keys, passed):
                if freed >= target:
                    return freed
                if over_only and not self.tenants.over_share(tenant_of_key(unit[0].key),
                                                             shares):
                    if not self._anyone_over(shares):
                        break  # no tenant holds more than its share: no scan of the rest
                    continue
                freed += _memory_bytes(unit)
                self._evict_unit(unit)
        return freed

    def _unblock(self) -> None:
        """Something a round passed over may leave memory now (a task reported back)."""
        self._blocked_until = 0.0

    def _anyone_over(self, shares: Mapping[str, int]) -> bool:
        return any(self.tenants.over_share(tenant, shares) for tenant in shares)

    @property
    def offloading(self) -> bool:
        """Whether offloads are on their way, each to free memory when it lands."""
        return self._offloading_bytes > 0

    def fit_quota(self, tenant: str, nbytes: int) -> bool:
        """Make ``nbytes`` more of ``tenant`` fit its quota by evicting the tenant's own
        objects, oldest first, soft-pinned last (never another tenant's). ``False``, having
        evicted nothing, when even all of its evictable objects would not make room."""
        excess = self.tenants.excess(tenant, nbytes)
        if not excess:
            return True
        now = self.clock()
        victims: list[list[StoredObject]] = []
        freed = 0
        for soft in (False, True):  # in the tenant's own order, soft-pinned last
            for unit in self._units(now, True, self.table.eviction.part(tenant)):
                if freed >= excess:
                    break
                if unit[0].soft_pinned(now) is soft:
                    victims.append(unit)
                    freed += _memory_bytes(unit)
        if freed < excess:
            return False
        for unit in victims:
            self._evict_unit(unit)
        return True

    def _units(self, now: float, allow_soft: bool, keys: Iterable[str],
               passed: _Passed | None = None) -> Iterator[list[StoredObject]]:
        """What of ``keys`` may leave memory, in their order: an object, or the evictable
        members of its group (none while a member is leased or busy). What a caller evicts
        between two units is skipped; ``passed`` learns when the leases met end."""
        seen: set[str] = set()
        for key in keys:
            obj = self.table.objects.get(key)
            if key in seen or obj is None or key not in self.table.eviction:
                continue
            group = self.table.group_of(obj)
            seen.update(o.key for o in group)
            if passed is not None:
                passed.met(obj, group, now)
            if any(o.leased(now) or o.busy for o in group):
                continue
            unit = [o for o in (obj, *group) if self._evictable(o, now, allow_soft)]
            if unit and unit[0] is obj:
                yield unit

    def _evictable(self, obj: StoredObject, now: float, allow_soft: bool) -> bool:
        if obj.leased(now) or obj.busy or obj.hard_pinned or not obj.complete:
            return False
        return obj.key in self.table.eviction and (allow_soft or not obj.soft_pinned(now))

    def _evict_unit(self, unit: list[StoredObject]) -> None:
        for obj in unit:
            if self.table.objects.get(obj.key) is obj:
                self._evict_one(obj)

    def _evict_one(self, obj: StoredObject) -> None:
        self.counters["evicted"] += 1
        self.tenants.count_eviction(tenant_of_key(obj.key))
        self.table.eviction.discard(obj.key)
        if obj.readable(Tier.DISK):
            self._drop_memory(obj)
            return
        for replica in obj.readable(Tier.MEMORY):
            segment = self.registry.segments[replica.segment_id]
            if self._disk_room(segment, obj.size):
                segment.disk_used += obj.size  # reserved until the offload reports back
                self._offloading_bytes += obj.size
                self.tenants.offload_started(obj.object_id, tenant_of_key(obj.key),
                                             obj.size * len(obj.readable(Tier.MEMORY)))
                obj.busy += 1
                self.table.tasks.append(OffloadTask(obj.key, segment.segment_id,
                                                    replica.offset, obj.size, obj.object_id))
                return
        self.table.delete(obj)

    def _disk_room(self, segment: MountedSegment, nbytes: int) -> bool:
        """Whether ``segment``'s disk takes ``nbytes`` more, once its least recently used
        copies are dropped to make room: soft-pinned ones last, never one that is leased or
        has a transfer in flight. Drops nothing when even that would not make room."""
        short = segment.disk_used + nbytes - segment.disk_capacity
        if short <= 0 or nbytes > segment.disk_capacity:
            return short <= 0
        victims = self._disk_victims(segment, short)
        for obj, replica in victims:
            self.counters["disk_evicted"] += 1
            self.table.drop_replica(obj, replica)
        return bool(victims)

    def _disk_victims(self, segment: MountedSegment, short: int
                      ) -> list[tuple[StoredObject, Replica]]:
        """The disk copies on ``segment`` to drop to free ``short`` bytes, oldest first; none
        if they cannot free that much."""
        now = self.clock()
        victims: dict[str, tuple[StoredObject, Replica]] = {}
        freed = 0
        for allow_soft in (False, True):
            for key in self.table.disk_order:
                if freed >= short:
                    break
                obj = self.table.objects[key]
                if key in victims or obj.busy or obj.leased(now) or (
                        obj.soft_pinned(now) and not allow_soft):
                    continue
                replica = next((r for r in obj.readable(Tier.DISK)
                                if r.segment_id == segment.segment_id), None)
                if replica is not None:
                    victims[key] = (obj, replica)
                    freed += replica.size
        return list(victims.values()) if freed >= short else []

    def _drop_memory(self, obj: StoredObject) -> None:
        """Drop ``obj``'s memory replicas (it is on disk now); memory a reader leased while
        the offload ran is kept from reuse until that lease ends."""
        self.table.changed(obj.key)
        for replica in obj.readable(Tier.MEMORY):
            self.table.move(replica, ReplicaState.REMOVED)
            self.table.release(obj.key, replica, hold_until=obj.lease_until)
            obj.replicas.remove(replica)

    # ----- the disk tier
    def offload_done(self, task: OffloadTask, ok: bool) -> None:
        """The node finished (or failed) writing ``task.key`` to its disk."""
        self._unblock()
        self._offloading_bytes -= task.size
        self.tenants.offload_ended(task.object_id)
        obj = self._same_object(task.key, task.object_id)
        segment = self.registry.segments.get(task.segment_id)
        if segment is not None and (obj is None or not ok):
            segment.disk_used -= task.size
            if ok:  # the object was removed meanwhile: its file is garbage
                self.table.tasks.append(DropDiskTask(task.key, task.segment_id))
        if obj is None:
            return
        obj.busy -= 1
        if not ok or segment is None:
            self.table.delete(obj, hold_until=obj.lease_until)  # chosen for eviction anyway
            return
        disk = Replica(task.segment_id, 0, task.size, Tier.DISK)
        disk.move_to(ReplicaState.PROCESSING)
        self.table.move(disk, ReplicaState.COMPLETE)
        obj.replicas.append(disk)
        segment.keys.add(task.key)
        self.table.disk_order.insert(task.key)
        self._drop_memory(obj)
        self.counters["offloaded"] += 1

    def promote(self, obj: StoredObject) -> ErrorCode:
        """Queue a copy of ``obj``'s disk replica into memory; ``REPLICA_IS_NOT_READY`` until
        it lands (``NO_AVAILABLE_HANDLE`` when even eviction leaves no room)."""
        if obj.busy:
            return ErrorCode.REPLICA_IS_NOT_READY  # a promotion is already on its way
        tenant = tenant_of_key(obj.key)
        self.fit_quota(tenant, obj.size)  # best effort: a read is never refused for quota
        disk = obj.readable(Tier.DISK)[0]
        segment = self.registry.segments[disk.segment_id]
        offset = segment.allocator.allocate(obj.size)
        if offset is None:
            self.evict(self.clock(), need=obj.size)
            offset = segment.allocator.allocate(obj.size)
        if offset is None:
            return ErrorCode.NO_AVAILABLE_HANDLE
        replica = Replica(segment.segment_id, offset, obj.size)
        replica.move_to(ReplicaState.PROCESSING)
        obj.replicas.append(replica)
        self.tenants.charge(tenant, obj.size)
        obj.busy += 1
        self.table.tasks.append(PromoteTask(obj.key, segment.segment_id, offset, obj.size,
                                            obj.object_id))
        return ErrorCode.REPLICA_IS_NOT_READY

    def _same_object(self, key: str, object_id: int) -> StoredObject | None:
        """The object a task was queued for; ``None`` if it was removed (even if the key was
        put again since)."""
        obj = self.table.objects.get(key)
        return obj if obj is not None and obj.object_id == object_id else None

    def promote_done(self, task: PromoteTask, ok: bool) -> None:
        self._unblock()
        obj = self._same_object(task.key, task.object_id)
        if obj is None:
            return
        obj.busy -= 1
        replica = next((r for r in obj.replicas if r.tier is Tier.MEMORY
                        and r.segment_id == task.segment_id and r.offset == task.offset), None)
        if replica is None:
            return  # the segment died meanwhile
        if ok:
            self.table.move(replica, ReplicaState.COMPLETE)
            self.table.eviction.insert(task.key)
            self.counters["promoted"] += 1
            self.table.changed(task.key)
            return
        self.table.move(replica, ReplicaState.FAILED)
        self.table.release(task.key, replica)
        obj.replicas.remove(replica)


class _Passed:
    """When the earliest lease that kept an object of a round in memory ends (at most
    ``until`` as made: a bound on how long any round's findings are trusted)."""

    def __init__(self, until: float) -> None:
        self.until = until

    def met(self, obj: StoredObject, group: list[StoredObject], now: float) -> None:
        for member in (obj, *group):
            if member.leased(now):
                self.until = min(self.until, member.lease_until)


def _memory_bytes(unit: list[StoredObject]) -> int:
    return sum(o.size * len(o.readable(Tier.MEMORY)) for o in unit)
