"""Arenas: space a client of the master's host puts into without asking, and the rings that
tell the master what it put there (the protocol: :mod:`kvcake.store.commits`).

A client holds at most one arena, an allocation of its own in a segment of its host. Each
record read from its ring cuts one object from the arena's front; the rest stays the
arena's, until the client asks for another (the rest is freed then) or goes away::

    arena   [ k1 ][ k2 ][            rest: one allocation, the client's             ]
            objects, each an allocation   ^ cursor                                 ^ end

Only a master that publishes its location table grants arenas (a lone master, no journal,
no cluster token: the same trust as the table), and only to clients of its host whose
tenant has no quota (a put must not be refused after it returned). Arenas take only room
below the high watermark, at most a sixteenth of a segment each and a quarter of the pool
all together, so they never make an object leave; a closing client gives its arena back,
a silent one loses it with its registration.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.log import get_logger
from kvcake.store.commits import BadRecordError, Commit, CommitRing
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.objects import ObjectTable, PutTerms
from kvcake.store.master.segments import MountedSegment
from kvcake.store.master.tenants import TenantLedger, scoped_key
from kvcake.store.master.tiering import Tiering
from kvcake.transfer.segment import offers_local_mapping

log = get_logger(__name__)
RING_BYTES = 1 << 20
_MIN_ARENA = 1 << 16
_SHARE = 16  # an arena takes at most this fraction of its segment
_POOL_SHARE = 4  # all arenas together, at most this fraction of the pool


@dataclass
class Arena:
    segment_id: int
    cursor: int  # the rest's offset (== end: nothing left)
    end: int


class Arenas:
    """``tiering``: evicts past the high watermark once puts are placed; ``check_key``:
    refuses a bad user key."""

    def __init__(self, config: MasterConfig, table: ObjectTable, tenants: TenantLedger,
                 tiering: Tiering, check_key: Callable[[str], None]) -> None:
        self.config = config
        self._table = table
        self._tenants = tenants
        self._tiering = tiering
        self._counters = tiering.counters
        self._check_key = check_key
        self.arenas: dict[str, Arena] = {}
        self.rings: dict[str, CommitRing] = {}
        self._ring_ids = itertools.count(1)

    def grant(self, client_id: str, tenant: str) -> tuple[Arena, str] | ErrorCode:
        """A fresh arena for ``client_id`` (its last one's rest freed) and its ring's path;
        ``NO_AVAILABLE_HANDLE`` where none can be had now, ``UNAVAILABLE_IN_CURRENT_MODE``
        where this client never gets one."""
        published = self._table.published
        host_id = self._table.registry.client(client_id).host_id
        if published is None or not self.config.arena_bytes or host_id != published.host_id \
                or self._tenants.quota(tenant):
            return ErrorCode.UNAVAILABLE_IN_CURRENT_MODE
        self.drain()
        self._give_back(client_id)
        ring = self.rings.get(client_id)
        if ring is None:
            try:
                ring = CommitRing(f"{published.path}-puts-{next(self._ring_ids)}", RING_BYTES)
            except OSError as exc:
                log.warning("no commit ring for client %s (%s): its puts ask", client_id, exc)
                return ErrorCode.UNAVAILABLE_IN_CURRENT_MODE
            self.rings[client_id] = ring
        placed = self._allocate(host_id)
        if placed is None:
            return ErrorCode.NO_AVAILABLE_HANDLE
        self.arenas[client_id] = placed
        return placed, ring.path

    def _allocate(self, host_id: str) -> Arena | None:
        """An arena on the segment of ``host_id`` with the most free bytes that holds one,
        out of the room below the high watermark (an arena never makes anything leave),
        while all arenas together hold at most a quarter of the pool."""
        used, total = self._table.registry.memory_usage()
        room = min(int(self.config.high_watermark * total) - used,
                   total // _POOL_SHARE - self.rest_bytes())
        segments = sorted((s for s in self._table.registry.segments.values()
                           if offers_local_mapping(s.descriptor, host_id)),
                          key=lambda s: s.allocator.free_bytes, reverse=True)
        for segment in segments:
            nbytes = self._arena_bytes(segment)
            offset = segment.allocator.allocate(nbytes) if 0 < nbytes <= room else None
            if offset is not None:
                return Arena(segment.segment_id, offset, offset + nbytes)
        return None

    def _arena_bytes(self, segment: MountedSegment) -> int:
        nbytes = min(self.config.arena_bytes, segment.allocator.capacity // _SHARE) // 64 * 64
        return nbytes if nbytes >= _MIN_ARENA else 0

    def drain(self) -> None:
        """Place every put recorded in the rings (before any request is served); evict as
        a put's end does, past the high watermark."""
        placed = self._counters["arena_puts"]
        for client_id, ring in list(self.rings.items()):
            if ring.pending:
                self._drain(client_id, ring)
        if self._counters["arena_puts"] != placed:
            self._tiering.evict_if_needed(self._table.clock())

    def _drain(self, client_id: str, ring: CommitRing) -> None:
        try:
            commits = ring.take()
        except BadRecordError as exc:
            log.warning("client %s: unreadable put record (%s); its arena is revoked",
                        client_id, exc)
            self.revoke(client_id)
            return
        for commit in commits:
            arena = self.arenas.get(client_id)
            fault = "no arena" if arena is None else self._place(client_id, arena, commit)
            if fault:
                log.warning("client %s: put of %r at %d (%d bytes) refused: %s; its arena "
                            "is revoked", client_id, commit.key, commit.offset, commit.size,
                            fault)
                self.revoke(client_id)
                return

    def _place(self, client_id: str, arena: Arena, commit: Commit) -> str:
        """Cut ``commit``'s object from the arena's front; what was wrong with it, if any."""
        if commit.offset != arena.cursor or not 0 < commit.size <= arena.end - arena.cursor:
            return f"the arena's next {arena.end - arena.cursor} bytes are at {arena.cursor}"
        try:
            self._check_key(commit.key)
            tenant = self._table.registry.client(client_id).tenant
        except KvcakeError as exc:
            return str(exc)
        segment = self._table.registry.segments[arena.segment_id]
        rest = segment.allocator.split(arena.cursor, commit.size)
        arena.cursor = arena.end if rest is None else rest
        key = scoped_key(tenant, commit.key)
        if key in self._table.objects:  # kept, as a put of a key that exists keeps it
            segment.allocator.free(commit.offset)
            self._counters["arena_puts_kept"] += 1
            return ""
        self._table.create(client_id, key, commit.size, PutTerms(), [arena.segment_id],
                           [commit.offset])
        self._table.complete(client_id, key)
        self._counters["arena_puts"] += 1
        return ""

    def release(self, client_id: str) -> None:
        """``client_id`` writes no more (it is closing): what it put is placed, the rest of
        its arena freed, its ring removed."""
        self.drain()
        self._give_back(client_id)
        self._end_ring(client_id)

    def revoke(self, client_id: str) -> None:
        """Stop reading ``client_id``'s ring (it asks again, and gets a new one) and free
        its arena's rest, held until a writer mid-copy is surely done (``put_timeout_s``)."""
        self._end_ring(client_id)
        arena = self.arenas.pop(client_id, None)
        if arena is not None and arena.cursor < arena.end:
            self._table.retire(arena.segment_id, arena.cursor,
                               self._table.clock() + self.config.put_timeout_s)

    def _end_ring(self, client_id: str) -> None:
        """Remove ``client_id``'s ring, flagged revoked: the client stops writing there."""
        ring = self.rings.pop(client_id, None)
        if ring is not None:
            ring.revoke()
            ring.close()

    def _give_back(self, client_id: str) -> None:
        """Free the rest of the arena ``client_id`` is done with (it asked for another)."""
        arena = self.arenas.pop(client_id, None)
        if arena is not None and arena.cursor < arena.end:
            self._table.registry.segments[arena.segment_id].allocator.free(arena.cursor)

    def drop_segment(self, segment_id: int) -> None:
        """Before the segment goes (its allocator with it): what was put there is placed,
        and arenas there end."""
        self.drain()
        for client_id in [c for c, a in self.arenas.items() if a.segment_id == segment_id]:
            del self.arenas[client_id]  # nothing to free: the allocator goes too
            self._end_ring(client_id)

    def rest_bytes(self) -> int:
        """Bytes granted to arenas and not put into yet."""
        return sum(a.end - a.cursor for a in self.arenas.values())

    def held(self, segment_id: int) -> int:
        """Allocations of ``segment_id`` that arenas hold (for integrity checks)."""
        return sum(a.segment_id == segment_id and a.cursor < a.end
                   for a in self.arenas.values())

    def close(self) -> None:
        for ring in self.rings.values():
            ring.close()
        self.rings.clear()
