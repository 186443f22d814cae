"""What a master persists for failover, and how a new leader rebuilds itself from it. No I/O.

The leader keeps one etcd record per mounted segment and per *complete* object; in-flight
puts, leases and counters are not persisted (a put open at failover fails at ``put_end``
and is retried by its writer; leases are seconds long)::

    <prefix>leader              LeaderRecord under the leader's etcd lease
    <prefix>segments/<id>       SegmentRecord: descriptor, owner, disk tier
    <prefix>objects/<key>       ObjectRecord: size, replicas (segment id, offset, tier), pins,
                                group

:class:`ChangeSet` is what the service marks as it changes (keys and segment ids, never
values): a flush reads the *current* state of each marked name, so many changes of one key
between flushes cost one write. Memory a durable record may still point at is not reused
until the record's removal is durable (``ChangeSet.frees``): a new leader can never hand out
the bytes of an object it still believes in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from kvcake.common import codec
from kvcake.store.leader import Layout
from kvcake.store.master.allocator import SegmentAllocator
from kvcake.store.master.replica import Replica, ReplicaState, StoredObject, Tier
from kvcake.store.master.segments import MountedSegment
from kvcake.transfer.segment import SegmentDescriptor

if TYPE_CHECKING:
    from kvcake.store.master.service import MasterService

@dataclass
class ChangeSet:
    """Names changed since the last flush, and allocator ranges held until it lands."""

    objects: set[str] = field(default_factory=set)
    segments: set[int] = field(default_factory=set)
    frees: list[tuple[int, int]] = field(default_factory=list)  # (segment id, offset)

    def __bool__(self) -> bool:
        return bool(self.objects or self.segments or self.frees)


class ReplicaRecord(msgspec.Struct, frozen=True, array_like=True):
    segment_id: int
    offset: int
    disk: bool


class ObjectRecord(msgspec.Struct, frozen=True, array_like=True):
    size: int
    replicas: list[ReplicaRecord]
    owner: str
    hard_pinned: bool = False
    soft_pin_left_s: float = 0.0  # at the time of writing; restored as "from now"
    group: str = ""  # scoped group id


class SegmentRecord(msgspec.Struct, frozen=True):
    segment_id: int
    descriptor: SegmentDescriptor
    client_id: str
    host_id: str
    disk_capacity: int = 0
    control_endpoint: str = ""


# ----- leader -> etcd
Write = tuple[str, bytes | None]  # etcd key, value (None: delete)


def writes_for(service: MasterService, changes: ChangeSet, layout: Layout) -> list[Write]:
    """The etcd writes that make the records match the service for every changed name."""
    now = service.clock()
    writes: list[Write] = []
    for segment_id in sorted(changes.segments):
        segment = service.registry.segments.get(segment_id)
        value = codec.encode(segment_record(service, segment)) if segment else None
        writes.append((layout.segment_key(segment_id), value))
    for key in sorted(changes.objects):
        obj = service.objects.get(key)
        record = object_record(obj, now) if obj is not None else None
        writes.append((layout.object_key(key), codec.encode(record) if record else None))
    return writes


def segment_record(service: MasterService, segment: MountedSegment) -> SegmentRecord:
    owner = service.registry.clients.get(segment.client_id)
    return SegmentRecord(segment.segment_id, segment.descriptor, segment.client_id,
                         owner.host_id if owner else "", segment.disk_capacity,
                         segment.control_endpoint)


def object_record(obj: StoredObject, now: float) -> ObjectRecord | None:
    """The record of a complete object (``None``: nothing durable to keep)."""
    replicas = [ReplicaRecord(r.segment_id, r.offset, r.tier is Tier.DISK)
                for r in obj.readable()]
    if not obj.complete or not replicas:
        return None
    return ObjectRecord(obj.size, replicas, obj.owner, obj.hard_pinned,
                        max(0.0, obj.soft_pin_until - now), obj.group)


# ----- etcd -> a new leader
def restore(service: MasterService, segments: Iterable[SegmentRecord],
            objects: Iterable[tuple[str, ObjectRecord]]) -> None:
    """Rebuild an empty service from records. ``objects`` in eviction order (oldest first);
    replicas on segments without a record are dropped, objects left without one skipped.
    Owners of restored segments count as alive from now: they have ``client_ttl_s`` to
    rejoin before their segments are dropped. Objects count as leased for one lease from
    now: a reader leased by the old leader may still be copying out, so their memory is
    neither evicted nor reused before that lease could have ended."""
    now = service.clock()
    by_id = {s.segment_id: s for s in segments}
    placed: dict[int, list[tuple[int, int]]] = {i: [] for i in by_id}
    kept: list[tuple[str, ObjectRecord, list[ReplicaRecord]]] = []
    for key, record in objects:
        replicas = [r for r in record.replicas if r.segment_id in by_id]
        if replicas:
            kept.append((key, record, replicas))
            placed_memory = ((r.segment_id, r.offset) for r in replicas if not r.disk)
            for segment_id, offset in placed_memory:
                placed[segment_id].append((offset, record.size))
    service.restore(((_segment(s, placed[i]), s.host_id) for i, s in by_id.items()),
                    (_object(key, record, replicas, now, now + service.config.lease_ttl_s)
                     for key, record, replicas in kept), now)


def _segment(record: SegmentRecord, allocations: list[tuple[int, int]]) -> MountedSegment:
    allocator = SegmentAllocator.with_allocations(record.descriptor.size, allocations)
    return MountedSegment(record.segment_id, record.descriptor, record.client_id, allocator,
                          record.disk_capacity, record.control_endpoint)


def _object(key: str, record: ObjectRecord, replicas: list[ReplicaRecord],
            now: float, leased_until: float) -> StoredObject:
    restored = []
    for r in replicas:
        replica = Replica(r.segment_id, r.offset, record.size,
                          Tier.DISK if r.disk else Tier.MEMORY)
        replica.move_to(ReplicaState.PROCESSING)
        replica.move_to(ReplicaState.COMPLETE)
        restored.append(replica)
    return StoredObject(key, record.size, restored, None, now, lease_until=leased_until,
                        soft_pin_until=now + record.soft_pin_left_s if record.soft_pin_left_s
                        else 0.0, hard_pinned=record.hard_pinned, owner=record.owner,
                        group=record.group)
