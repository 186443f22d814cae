"""The master's object table: objects by key, their replicas' memory, the eviction order,
groups, and what changed since the last flush (:class:`ChangeSet`). No I/O, no policy.

Keys here are object keys (a tenant's keys are scoped, :mod:`kvcake.store.master.tenants`).
Every replica in memory holds an allocation of its segment and is charged to its tenant,
from :meth:`ObjectTable.create` until :meth:`ObjectTable.release`. A complete object with a
memory replica is in the eviction order, unless an offload or promotion of it is in flight;
an object with a disk replica is in the disk order, which the disk tier evicts by.

Memory someone may still be reading or writing outlives its object: an upsert that replaces
a leased object, or takes over a put still being written, a forced remove of a leased
object, and an offload that ends while a reader holds a lease *retire* the old replicas'
memory until the lease (or the old writer's put timeout) runs out, then free it (at the
next put or tick); retired memory is counted apart (``Stats.retired_bytes``) and counts as
coming back, not as used, for eviction::

    replica (allocated, charged) --delete(hold_until)--> retired (allocated, not charged)
                                                  --free_retired(now >= until)--> free
"""

from __future__ import annotations

import heapq
import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from kvcake.common.errors import ErrorCode
from kvcake.store.locations import NO_SEGMENT, LocationTable
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.eviction import SplitOrder, make_eviction_policy
from kvcake.store.master.groups import GroupIndex
from kvcake.store.master.journal import ChangeSet
from kvcake.store.master.replica import Replica, ReplicaState, StoredObject, Tier
from kvcake.store.master.segments import MountedSegment, SegmentRegistry
from kvcake.store.master.tenants import TenantLedger, tenant_of_key, usage_by_tenant
from kvcake.store.master.tiering import DropDiskTask, Task
from kvcake.transfer.segment import offers_local_mapping
from kvcake.wire.store import ReplicaHandle


@dataclass(frozen=True)
class PutTerms:
    """What a new object carries besides its bytes (the service works them out)."""

    hard_pinned: bool = False
    soft_pin_until: float = 0.0  # clock time; 0: not soft-pinned
    group: str = ""  # scoped group id; "": none


@dataclass(frozen=True, order=True)
class Retired:
    """Allocated memory of a deleted replica, freed at ``until`` (ordered by it)."""

    until: float
    segment_id: int
    offset: int
    size: int  # the allocation's bytes
    durable: bool  # its object was complete (a durable record may point at it)


class ObjectTable:
    """Objects and their replicas' lifecycle; ``tasks`` queues the disk-tier work for nodes."""

    def __init__(self, config: MasterConfig, clock: Callable[[], float],
                 registry: SegmentRegistry, tenants: TenantLedger) -> None:
        self.config = config
        self.clock = clock
        self.registry = registry
        self.tenants = tenants
        self.objects: dict[str, StoredObject] = {}
        self.open_puts: dict[str, StoredObject] = {}  # objects not complete yet, oldest first
        self.eviction = SplitOrder(config.eviction, tenant_of_key)  # memory, per tenant too
        self.disk_order = make_eviction_policy(config.eviction)  # objects on a disk tier
        self.tasks: list[Task] = []
        self.changes: ChangeSet | None = None  # set by a master that persists its state
        self.published: LocationTable | None = None  # set by a master that publishes
        self._to_publish: set[str] = set()
        self.groups = GroupIndex()
        self.retired: list[Retired] = []  # a heap: the first to be freed first
        self.retired_bytes = 0  # theirs all together
        # Ids count up from a random start, so that no two masters (a restart, a failover)
        # give one out twice: a reader compares them across answers (GetReplicasReply).
        self._object_ids = itertools.count(secrets.randbits(60))
        self.readable_replicas = 0  # COMPLETE replicas of all objects (stats without a scan)
        self.keys_by_tenant: dict[str, int] = {}  # each tenant's complete objects

    # ----- puts
    def create(self, client_id: str, key: str, size: int, terms: PutTerms,
               chosen: list[int], offsets: list[int] | None = None) -> list[ReplicaHandle]:
        """Allocate ``key`` on the ``chosen`` segments (or take the allocations at
        ``offsets`` there, made already); the writer's handles."""
        now = self.clock()
        replicas = []
        for i, segment_id in enumerate(chosen):
            segment = self.registry.segments[segment_id]
            offset = segment.allocator.allocate(size) if offsets is None else offsets[i]
            assert offset is not None, "placement chose a segment without room"
            replica = Replica(segment_id, offset, size)
            replica.move_to(ReplicaState.PROCESSING)  # handed to the writer now
            replicas.append(replica)
            segment.keys.add(key)
        self.tenants.charge(tenant_of_key(key), size * len(replicas))
        self.objects[key] = self.open_puts[key] = StoredObject(
            key, size, replicas, client_id, now, object_id=next(self._object_ids),
            owner=client_id, soft_pin_until=terms.soft_pin_until,
            hard_pinned=terms.hard_pinned, group=terms.group,
        )
        self.groups.add(terms.group, key)
        return [ReplicaHandle(r.segment_id, r.offset) for r in replicas]

    def complete(self, client_id: str, key: str) -> ErrorCode:
        """End ``client_id``'s put of ``key``: readable, and in the eviction order."""
        obj = self.open_put(client_id, key)
        if isinstance(obj, ErrorCode):
            return obj
        for replica in obj.replicas:
            if replica.state is ReplicaState.PROCESSING:
                self.move(replica, ReplicaState.COMPLETE)
        if not obj.readable():  # every segment it was written to died meanwhile
            self.delete(obj)
            return ErrorCode.INVALID_WRITE
        obj.writer = None
        del self.open_puts[key]
        self._count_key(key, 1)
        self.eviction.insert(key)
        self.changed(key)
        return ErrorCode.OK

    def move(self, replica: Replica, state: ReplicaState) -> None:
        """Move a replica of a stored object (or of one about to be) to ``state``."""
        was = replica.readable
        replica.move_to(state)
        self.readable_replicas += replica.readable - was

    def _count_key(self, key: str, delta: int) -> None:
        tenant = tenant_of_key(key)
        count = self.keys_by_tenant.get(tenant, 0) + delta
        if count:
            self.keys_by_tenant[tenant] = count
        else:
            del self.keys_by_tenant[tenant]

    def open_put(self, client_id: str, key: str) -> StoredObject | ErrorCode:
        obj = self.objects.get(key)
        if obj is None:
            return ErrorCode.OBJECT_NOT_FOUND
        if obj.writer != client_id:
            return ErrorCode.INVALID_WRITE  # complete already, or someone else's put
        return obj

    def fail_put(self, obj: StoredObject, hold_until: float = 0.0) -> None:
        for replica in obj.replicas:
            if replica.state is not ReplicaState.FAILED:
                self.move(replica, ReplicaState.FAILED)
        self.delete(obj, hold_until)

    # ----- reads and removal
    def lease(self, key: str) -> StoredObject | None:
        """The complete object ``key``, leased to a reader for ``lease_ttl_s`` from now (with
        every complete member of its group)."""
        obj = self.objects.get(key)
        if obj is None or not obj.complete:
            return None
        until = self.clock() + self.config.lease_ttl_s
        for member in [obj, *self.group_of(obj)]:
            if member.complete:
                member.lease_until = max(member.lease_until, until)
        return obj

    def group_of(self, obj: StoredObject) -> list[StoredObject]:
        """The other members of ``obj``'s group."""
        return [self.objects[k] for k in sorted(self.groups.members(obj.group)) if k != obj.key]

    def remove(self, key: str, force: bool) -> ErrorCode:
        obj = self.objects.get(key)
        if obj is None:
            return ErrorCode.OBJECT_NOT_FOUND
        if not force:
            if not obj.complete:
                return ErrorCode.REPLICA_IS_NOT_READY
            if obj.leased(self.clock()) or obj.busy:
                return ErrorCode.OBJECT_HAS_LEASE
        self.delete(obj, hold_until=obj.lease_until)  # forced: its readers' memory kept
        return ErrorCode.OK

    def delete(self, obj: StoredObject, hold_until: float = 0.0) -> None:
        """Forget ``obj``: free its memory (or retire it until ``hold_until``, when that is
        still ahead), drop its disk files."""
        if obj.complete:
            self.changed(obj.key)  # unpublished before its memory is freed
            self._count_key(obj.key, -1)
        for replica in obj.replicas:
            if replica.state in (ReplicaState.PROCESSING, ReplicaState.COMPLETE):
                self.move(replica, ReplicaState.REMOVED)
            self.release(obj.key, replica, hold_until)
        del self.objects[obj.key]
        self.open_puts.pop(obj.key, None)
        self.eviction.discard(obj.key)
        self.disk_order.discard(obj.key)
        self.groups.discard(obj.group, obj.key)

    def release(self, key: str, replica: Replica, hold_until: float = 0.0) -> None:
        if replica.tier is Tier.MEMORY:
            self.tenants.charge(tenant_of_key(key), -replica.size)
        segment = self.registry.segments.get(replica.segment_id)
        if segment is None:
            return
        if replica.tier is Tier.MEMORY:
            durable = self.objects[key].complete
            if hold_until > self.clock():
                self._hold(segment, replica.offset, hold_until, durable)
            else:
                self._free(segment, replica.offset, durable)
        else:
            segment.disk_used -= replica.size
            self.tasks.append(DropDiskTask(key, segment.segment_id))
        if not any(r.segment_id == segment.segment_id for r in self.objects[key].replicas
                   if r is not replica and r.state is not ReplicaState.REMOVED):
            segment.keys.discard(key)

    def drop_replica(self, obj: StoredObject, replica: Replica) -> None:
        """Remove one readable replica of complete ``obj``; the object goes with its last."""
        if obj.readable() == [replica]:
            self.delete(obj)
            return
        self.move(replica, ReplicaState.REMOVED)
        self.release(obj.key, replica)
        obj.replicas.remove(replica)
        self.changed(obj.key)
        self._forget_tiers_left(obj)

    def drop_segment(self, segment: MountedSegment) -> None:
        """Lose every replica on ``segment``; objects with none left are gone."""
        for key in list(segment.keys):
            obj = self.objects[key]
            for replica in [r for r in obj.replicas if r.segment_id == segment.segment_id]:
                self.move(replica, ReplicaState.FAILED)
                obj.replicas.remove(replica)
                if replica.tier is Tier.MEMORY:  # its allocator goes with the segment
                    self.tenants.charge(tenant_of_key(key), -replica.size)
            self.changed(key)
            if not obj.replicas or (obj.complete and not obj.readable()):
                self.delete(obj)
            else:
                self._forget_tiers_left(obj)
        self.retired = [r for r in self.retired if r.segment_id != segment.segment_id]
        heapq.heapify(self.retired)
        self.retired_bytes = sum(r.size for r in self.retired)
        self.registry.unmount(segment.segment_id)
        self.changed_segment(segment.segment_id)

    def _forget_tiers_left(self, obj: StoredObject) -> None:
        """Take ``obj`` out of the order of each tier it no longer has a replica on."""
        if not obj.readable(Tier.MEMORY):
            self.eviction.discard(obj.key)
        if not obj.readable(Tier.DISK):
            self.disk_order.discard(obj.key)

    def touch(self, key: str) -> None:
        """``key`` was read: recently used in every tier it is on."""
        self.eviction.touch(key)
        self.disk_order.touch(key)

    def retire(self, segment_id: int, offset: int, until: float) -> None:
        """Free the allocation at ``offset`` once ``until`` has passed (someone may still
        write there); no durable record points at it."""
        self._hold(self.registry.segments[segment_id], offset, until, False)

    def _hold(self, segment: MountedSegment, offset: int, until: float, durable: bool) -> None:
        size = segment.allocator.allocation_size(offset)
        heapq.heappush(self.retired, Retired(until, segment.segment_id, offset, size, durable))
        self.retired_bytes += size

    def free_retired(self, now: float) -> None:
        """Free the retired memory whose time has come."""
        while self.retired and self.retired[0].until <= now:
            retired = heapq.heappop(self.retired)
            self.retired_bytes -= retired.size
            self._free(self.registry.segments[retired.segment_id], retired.offset,
                       retired.durable)

    # ----- persistence
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

    def changed(self, key: str) -> None:
        """``key``'s object changed: journalled, and unpublished at once (published again,
        as it is then, by :meth:`publish_changed`)."""
        if self.changes is not None:
            self.changes.objects.add(key)
        if self.published is not None:
            self.published.drop(key)
            self._to_publish.add(key)

    def publish(self, table: LocationTable) -> None:
        """From now on, keep ``table`` up to date with every complete object."""
        self.published = table
        self._to_publish.update(self.objects)
        self.publish_changed()

    def publish_changed(self) -> None:
        """Publish the objects changed since the last call, as they are now (before a reply
        leaves, so a client told of a change finds it)."""
        if self.published is None or not self._to_publish:
            return
        for key in self._to_publish:
            obj = self.objects.get(key)
            if obj is not None and obj.complete:
                self.published.publish(key, *self._location(obj, self.published.host_id))
        self._to_publish.clear()

    def _location(self, obj: StoredObject, host_id: str) -> tuple[int, int, int]:
        """Segment id and offset of ``obj``'s first memory replica mapped on ``host_id``, and
        its size (``NO_SEGMENT``: none; the key is still published, for ``is_exist``)."""
        for replica in obj.readable(Tier.MEMORY):
            segment = self.registry.segments.get(replica.segment_id)
            if segment is not None and offers_local_mapping(segment.descriptor, host_id):
                return replica.segment_id, replica.offset, obj.size
        return NO_SEGMENT, 0, obj.size

    def changed_segment(self, segment_id: int) -> None:
        if self.changes is not None:
            self.changes.segments.add(segment_id)

    def adopt(self, obj: StoredObject) -> None:
        """Take a complete object restored from a journal (its segments adopted already)."""
        obj.object_id = next(self._object_ids)
        for replica in obj.replicas:
            segment = self.registry.segments[replica.segment_id]
            segment.keys.add(obj.key)
            if replica.tier is Tier.DISK:
                segment.disk_used += obj.size
        self.objects[obj.key] = obj
        self.readable_replicas += len(obj.readable())
        self._count_key(obj.key, 1)
        self.groups.add(obj.group, obj.key)
        if obj.readable(Tier.MEMORY):
            self.eviction.insert(obj.key)
        if obj.readable(Tier.DISK):
            self.disk_order.insert(obj.key)

    def check_integrity(self, held_elsewhere: Callable[[int], int] = lambda _: 0) -> None:
        """Assert allocators, reverse indexes and the eviction order agree with the objects
        (``held_elsewhere(segment_id)``: allocations there that are no replica's)."""
        for segment in self.registry.segments.values():
            segment.allocator.check_integrity()
            memory = [r for o in self.objects.values() for r in o.replicas
                      if r.segment_id == segment.segment_id and r.tier is Tier.MEMORY]
            held = held_elsewhere(segment.segment_id)
            held += sum(i == segment.segment_id for i, _ in self.changes.frees) \
                if self.changes is not None else 0
            held += sum(r.segment_id == segment.segment_id for r in self.retired)
            assert segment.allocator.num_allocations == len(memory) + held, segment.name
            for key in segment.keys:
                assert any(r.segment_id == segment.segment_id for r in self.objects[key].replicas)
        assert self.retired_bytes == sum(r.size for r in self.retired)
        assert set(self.open_puts) == {k for k, o in self.objects.items() if not o.complete}
        assert all(self.objects[k] is o for k, o in self.open_puts.items())
        for key, obj in self.objects.items():
            assert obj.replicas, f"{key} has no replicas"
            in_order = obj.complete and bool(obj.readable(Tier.MEMORY)) and not obj.busy
            assert (key in self.eviction) == in_order or obj.busy, f"eviction order for {key}"
            assert (key in self.disk_order) == bool(obj.readable(Tier.DISK)), f"disk order {key}"
            memory = [r for r in obj.replicas if r.tier is Tier.MEMORY]
            assert len({r.segment_id for r in memory}) == len(memory), f"{key} replicas collide"
        self.eviction.check_integrity()
        assert self.readable_replicas == sum(len(o.readable()) for o in self.objects.values())
        counted: dict[str, int] = {}
        for key, obj in self.objects.items():
            if obj.complete:
                counted[tenant_of_key(key)] = counted.get(tenant_of_key(key), 0) + 1
        assert self.keys_by_tenant == counted, (self.keys_by_tenant, counted)
        self.tenants.check_integrity(usage_by_tenant(self.objects))
        self.groups.check_integrity({k: o.group for k, o in self.objects.items()})
