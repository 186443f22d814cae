"""A client's puts into its arena: a copy and a record, no master round trip (the protocol,
and why every later call still finds the put: :mod:`kvcake.store.commits`)::

    put k (plain: no upsert, default config, a valid key, at most a quarter of an arena)
      │ the arena usable (master alive, ring not revoked, segment's owner alive)
      │ and room for the value and its record ──── no ───> ask for a new arena (one
    copy the value to the cursor                           thread at a time; the others
    append (k, offset, size) to the ring                   put through the master meanwhile)
    answer 0                                               refused: through the master

A thread asking for a new arena first drops the old one, so no value lands in an arena the
master freed. A refusal (``NO_AVAILABLE_HANDLE``: no room now) is not asked again for
:data:`RETRY_S`; a client the master never grants one stops asking until it rejoins.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.log import get_logger
from kvcake.store.commits import CommitWriter, record_bytes
from kvcake.store.master.tenants import check_user_key
from kvcake.store.pieces import concatenated
from kvcake.store.replica_io import Live, ReplicaIo
from kvcake.store.steps import Ask, Plan
from kvcake.transfer import MappedRange
from kvcake.wire import store as m

log = get_logger(__name__)
RETRY_S = 1.0
_SHARE = 4  # values up to this fraction of an arena go through it


@dataclass
class _Arena:
    table: str  # the location table of the master that granted it
    segment_offset: int
    mapped: MappedRange
    ring: CommitWriter
    max_key_bytes: int
    cursor: int = 0  # into ``mapped``

    def usable(self, table: str) -> bool:
        return table == self.table and self.ring.usable() and self.mapped.owner_alive()

    def write(self, keys: Sequence[bytes], parts: Sequence[Sequence[memoryview]],
              sizes: Sequence[int]) -> int:
        """Write and record as many leading values as fit; how many."""
        room, records, cursor = self.ring.room(), [], self.cursor
        view = self.mapped.view
        for key, views, size in zip(keys, parts, sizes, strict=True):
            end = cursor + (size + 63) // 64 * 64
            room -= record_bytes(len(key))
            if end > len(view) or room < 0:
                break
            for offset, piece in concatenated(views):
                view[cursor + offset:cursor + offset + piece.nbytes] = piece
            records.append((key, self.segment_offset + cursor, size))
            cursor = end
        if records:
            self.ring.append(records)
            self.cursor = cursor
        return len(records)


class ArenaPuts:
    """``live()``: the session and engine; ``replicas``: the segments reached so far."""

    def __init__(self, live: Live, replicas: ReplicaIo) -> None:
        self._live = live
        self._replicas = replicas
        self._lock = threading.Lock()
        self._arena: _Arena | None = None
        self._granting = False
        self._refused: tuple[str, float] = ("", 0.0)  # a table, and until when not to ask
        self._closed = False

    def put(self, keys: Sequence[str], parts: Sequence[Sequence[memoryview]],
            sizes: Sequence[int]) -> Plan[int]:
        """Put the leading keys through the arena; how many (the rest ask the master)."""
        session, _ = self._live()
        table = session.locations
        done, fresh = 0, False
        if not sizes or not 0 < sizes[0] <= session.arena_bytes // _SHARE:
            return 0
        while done < len(keys):
            with self._lock:
                arena = self._arena
                if arena is not None and not arena.usable(table):
                    self._drop()
                    arena = None
                if arena is not None:
                    plain = _plain(keys[done:], sizes[done:], arena)
                    if not plain:
                        break  # not for an arena: the master says why
                    end = done + len(plain)
                    written = arena.write(plain, parts[done:end], sizes[done:end])
                    done += written
                    if written:
                        fresh = False
                        continue
                if fresh or self._granting or not self._may_ask(table):
                    break
                self._granting = True
                self._drop()  # nothing lands in the old one
            try:
                fresh = yield from self._grant(table)
            finally:
                self._granting = False
            if not fresh:
                break
        return done

    def _drop(self) -> None:
        """Stop writing to the arena held (the caller holds the lock)."""
        arena, self._arena = self._arena, None
        if arena is not None:
            arena.ring.close()

    def _may_ask(self, table: str) -> bool:
        refused_table, until = self._refused
        return not self._closed and (refused_table != table or time.monotonic() >= until)

    def _grant(self, table: str) -> Plan[bool]:
        """Ask for a new arena and take it; whether one came."""
        session, engine = self._live()
        try:
            reply = yield Ask(m.ArenaGrant(session.client_id), m.ArenaReply)
        except KvcakeError as exc:  # the put asks the master instead, which says what failed
            log.debug("no arena: %s", exc)
            reply = m.ArenaReply(ErrorCode.NO_AVAILABLE_HANDLE)
        if reply.code:
            retry = RETRY_S if reply.code == ErrorCode.NO_AVAILABLE_HANDLE else float("inf")
            self._refused = (table, time.monotonic() + retry)
            return False
        segments = yield from self._replicas.resolve([reply.segment_id])
        segment = segments.get(reply.segment_id)
        mapped = segment and engine.map_range(segment, reply.offset, reply.length)
        ring = _writer(reply.ring) if mapped else None
        if not mapped or ring is None:
            self._refused = (table, float("inf"))  # held until it asks again, or leaves
            return False
        with self._lock:
            self._arena = _Arena(table, reply.offset, mapped, ring, reply.max_key_bytes)
        return True

    def close(self) -> bool:
        """Write no more; whether an arena was held (the master should be told)."""
        with self._lock:
            held = self._arena is not None
            self._drop()
            self._closed = True
        return held


def _writer(path: str) -> CommitWriter | None:
    try:
        return CommitWriter(path)
    except OSError as exc:
        log.warning("commit ring %s unusable (%s): puts ask the master", path, exc)
        return None


def _plain(keys: Sequence[str], sizes: Sequence[int], arena: _Arena) -> list[bytes]:
    """The leading keys ``arena`` takes, encoded: valid keys of values no larger than a
    quarter of it (others ask the master, which says what is wrong with them)."""
    largest = len(arena.mapped.view) // _SHARE
    plain = []
    for key, size in zip(keys, sizes, strict=True):
        encoded = _encoded(key, arena.max_key_bytes) if 0 < size <= largest else None
        if encoded is None:
            break
        plain.append(encoded)
    return plain


def _encoded(key: str, max_key_bytes: int) -> bytes | None:
    """``key`` as UTF-8, if the master would take it."""
    try:
        encoded = key.encode()
        check_user_key(key)
    except (UnicodeEncodeError, KvcakeError):
        return None
    return encoded if 0 < len(encoded) <= max_key_bytes else None
