"""What the master knows about stored objects: replicas, their lifecycle, and objects.

A replica's life, as a table (STYLE.md §3)::

    INITIALIZED --grant to writer--> PROCESSING --put_end--> COMPLETE
         |                               |                      |
         +------------- put_revoke, writer or segment died -----+--> FAILED
         +------------------- remove, eviction -----------------+--> REMOVED

Readers are only ever given COMPLETE replicas, so a half-written object is invisible.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kvcake.common.errors import ErrorCode
from kvcake.common.lifecycle import Lifecycle


class ReplicaState(Enum):
    INITIALIZED = "initialized"
    PROCESSING = "processing"
    COMPLETE = "complete"
    REMOVED = "removed"
    FAILED = "failed"


class Tier(Enum):
    MEMORY = "memory"
    DISK = "disk"


_TERMINAL = frozenset({ReplicaState.REMOVED, ReplicaState.FAILED})
TRANSITIONS = Lifecycle({
    ReplicaState.INITIALIZED: frozenset({ReplicaState.PROCESSING}) | _TERMINAL,
    ReplicaState.PROCESSING: frozenset({ReplicaState.COMPLETE}) | _TERMINAL,
    ReplicaState.COMPLETE: _TERMINAL,
    ReplicaState.REMOVED: frozenset(),
    ReplicaState.FAILED: frozenset(),
}, ErrorCode.INVALID_REPLICA)


@dataclass
class Replica:
    """One copy of an object: ``size`` bytes at ``offset`` of mounted segment ``segment_id``
    (for the disk tier: a file of the owning node, ``offset`` unused)."""

    segment_id: int
    offset: int
    size: int
    tier: Tier = Tier.MEMORY
    state: ReplicaState = ReplicaState.INITIALIZED

    def move_to(self, state: ReplicaState) -> None:
        """Take one edge of the lifecycle; refuses any edge not in :data:`TRANSITIONS`."""
        self.state = TRANSITIONS.move(self.state, state, "replica on segment %d", self.segment_id)

    @property
    def readable(self) -> bool:
        return self.state is ReplicaState.COMPLETE


@dataclass
class StoredObject:
    """An object and its replicas. ``writer`` is the client whose put is still open."""

    key: str
    size: int
    replicas: list[Replica]
    writer: str | None
    put_started_at: float
    lease_until: float = 0.0
    soft_pin_until: float = 0.0
    hard_pinned: bool = False
    busy: int = 0  # offloads or promotions in flight: not removable, not evictable
    object_id: int = 0  # tells this put of ``key`` from earlier ones
    owner: str = ""  # the client that put it (``writer`` until complete)
    group: str = ""  # its group's scoped id (:mod:`kvcake.store.master.groups`), or none

    @property
    def complete(self) -> bool:
        return self.writer is None

    def readable(self, tier: Tier | None = None) -> list[Replica]:
        return [r for r in self.replicas if r.readable and (tier is None or r.tier is tier)]

    def leased(self, now: float) -> bool:
        return self.lease_until > now

    def soft_pinned(self, now: float) -> bool:
        return self.soft_pin_until > now
