"""The master's view of the pool: live clients and the segments they mounted.

Pure bookkeeping (no I/O, clock passed in). Each mounted segment owns a
:class:`SegmentAllocator` and knows which keys have a replica on it, so a dead node's
replicas are found without scanning every object.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError, SegmentNotFoundError
from kvcake.store.master.allocator import SegmentAllocator
from kvcake.transfer.segment import SegmentDescriptor


@dataclass
class MountedSegment:
    segment_id: int
    descriptor: SegmentDescriptor
    client_id: str
    allocator: SegmentAllocator
    disk_capacity: int = 0
    control_endpoint: str = ""
    disk_used: int = 0
    keys: set[str] = field(default_factory=set)  # objects with a replica here (any tier)

    @property
    def name(self) -> str:
        return self.descriptor.name

    @property
    def free_ratio(self) -> float:
        return self.allocator.free_bytes / self.allocator.size

    def can_allocate(self, nbytes: int) -> bool:
        return self.allocator.can_allocate(nbytes)

    def disk_room(self, nbytes: int) -> bool:
        return self.disk_used + nbytes <= self.disk_capacity


@dataclass
class ClientRecord:
    client_id: str
    host_id: str
    last_seen: float
    segment_ids: set[int] = field(default_factory=set)
    tenant: str = ""  # empty: not registered with this master yet (restored after failover)


class SegmentRegistry:
    """Clients by id, segments by master-assigned id (random, so a restarted master never
    reuses one a client may still cache). Names need not be unique: as in Mooncake, where a
    client's segment is named by its hostname, two clients may mount segments of one name.
    What is unique is a segment's name *and* where it is reached (its owner's endpoint and
    socket), so nobody mounts another's memory a second time under its name."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.clients: dict[str, ClientRecord] = {}
        self.segments: dict[int, MountedSegment] = {}
        self._by_place: dict[tuple[str, str, str], int] = {}  # see _place

    def register(self, client_id: str, host_id: str, now: float, tenant: str = "default") -> None:
        if not client_id:
            raise InvalidParamsError("client_id must not be empty")
        record = self.clients.get(client_id)
        if record is None:
            self.clients[client_id] = ClientRecord(client_id, host_id, now, tenant=tenant)
        else:
            record.last_seen = now
            record.tenant = tenant

    def heartbeat(self, client_id: str, now: float) -> bool:
        record = self.clients.get(client_id)
        if record is None:
            return False
        record.last_seen = now
        return True

    def client(self, client_id: str) -> ClientRecord:
        record = self.clients.get(client_id)
        if record is None:
            raise KvcakeError(f"unknown client {client_id!r}: register first",
                              ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
        return record

    def mount(self, client_id: str, descriptor: SegmentDescriptor, disk_capacity: int = 0,
              control_endpoint: str = "") -> int:
        record = self.client(client_id)
        _check_mountable(descriptor, disk_capacity, control_endpoint)
        if _place(descriptor) in self._by_place:
            raise KvcakeError(f"segment {descriptor.name!r} is already mounted",
                              ErrorCode.SEGMENT_ALREADY_EXISTS)
        segment_id = self._new_id()
        self.segments[segment_id] = MountedSegment(
            segment_id, descriptor, client_id, SegmentAllocator(descriptor.size), disk_capacity,
            control_endpoint,
        )
        self._by_place[_place(descriptor)] = segment_id
        record.segment_ids.add(segment_id)
        return segment_id

    def adopt(self, segment: MountedSegment, host_id: str, now: float) -> None:
        """Take a segment mounted under an earlier leader, keeping its id; its owner (on
        ``host_id``) counts as alive from ``now``."""
        owner = self.clients.setdefault(segment.client_id,
                                        ClientRecord(segment.client_id, host_id, now))
        owner.segment_ids.add(segment.segment_id)
        if _place(segment.descriptor) in self._by_place or segment.segment_id in self.segments:
            raise KvcakeError(f"segment {segment.name!r} is already mounted",
                              ErrorCode.SEGMENT_ALREADY_EXISTS)
        self.segments[segment.segment_id] = segment
        self._by_place[_place(segment.descriptor)] = segment.segment_id

    def unmount(self, segment_id: int) -> MountedSegment:
        """Forget the segment; the caller must already have dropped its replicas."""
        segment = self.segments.pop(segment_id, None)
        if segment is None:
            raise SegmentNotFoundError(f"no mounted segment with id {segment_id}")
        del self._by_place[_place(segment.descriptor)]
        owner = self.clients.get(segment.client_id)
        if owner is not None:
            owner.segment_ids.discard(segment_id)
        return segment

    def expired(self, now: float, ttl_s: float) -> list[str]:
        return [c.client_id for c in self.clients.values() if now - c.last_seen > ttl_s]

    def memory_usage(self) -> tuple[int, int]:
        """Bytes allocated, and bytes of all segments."""
        return (sum(s.allocator.used_bytes for s in self.segments.values()),
                sum(s.allocator.size for s in self.segments.values()))

    def largest_segment(self) -> int:
        return max((s.allocator.capacity for s in self.segments.values()), default=0)

    def _new_id(self) -> int:
        while (segment_id := self._rng.getrandbits(48)) in self.segments or segment_id == 0:
            pass
        return segment_id


def _place(descriptor: SegmentDescriptor) -> tuple[str, str, str]:
    """What identifies a segment: its name where it is reached."""
    return descriptor.name, descriptor.endpoint, descriptor.shm_socket


def _check_mountable(descriptor: SegmentDescriptor, disk_capacity: int,
                     control_endpoint: str) -> None:
    if not descriptor.name:
        raise InvalidParamsError("segment name must not be empty")
    if descriptor.size < 4096:
        raise InvalidParamsError(f"segment {descriptor.name!r} of {descriptor.size} bytes is "
                                 "too small (min 4096)")
    if not descriptor.endpoint and not descriptor.shm_socket:
        raise InvalidParamsError(f"segment {descriptor.name!r} has no endpoint to reach it by")
    if disk_capacity < 0:
        raise InvalidParamsError(f"disk_capacity must be >= 0, got {disk_capacity}")
    if disk_capacity and not control_endpoint:
        raise InvalidParamsError("a segment with a disk tier needs a control endpoint")
