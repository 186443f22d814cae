"""Same-host puts that skip the master: a client of the master's host writes a value into an
*arena* the master granted it (a run of a segment this client maps) and records the put in
its *commit ring*, a file in shared memory that the master reads before it serves anything::

    client                                 master
    ArenaGrant ──────────────────────────> allocate the arena; create the ring (once)
    <───────────── segment, offset, length, ring
    put k1: copy the value to the cursor, append (k1, offset, size) to the ring, return
    put k2: the same, no message
                                           before every request, each sweep: read the
                                           rings; each record becomes a complete object
                                           cut from the front of its arena

A put so returns before the master has heard of it, yet every later call of any client
finds it: each call is served only after the master has read every ring (a call cannot
be sent before the put that precedes it returns, and the record is in the ring by then).
A read through the location table that misses asks the master, which reads the rings
first. A key that exists when its record is read keeps its object (as a put of an existing
key does); the new bytes are freed.

The ring is one file per client (mode 0600, named after the master's location table) with
two counters on their own cache lines: ``written``, moved by the client after a record's
bytes are in place, and ``read``, moved by the master. A record is::

    record bytes (u32, a multiple of 8)  key bytes (u32)  offset (u64)  size (u64)  key

The master holds an exclusive ``flock`` on the ring while it lives, as on its table; it
sets ``revoked`` when the arena is gone (its segment dropped, a record it could not read),
and the client then stops writing there and asks again.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from kvcake.common.errors import InvalidParamsError
from kvcake.store.locations import create_held, remove_held, still_held

MAGIC = b"KVCKPUT1"
_HEADER = struct.Struct("<8sQ")  # magic, capacity (bytes of records)
_COUNTER = struct.Struct("<Q")
_READ, _WRITTEN, _REVOKED = 64, 128, 192  # each counter on its own cache line
_RECORDS = 256
_RECORD = struct.Struct("<IIQQ")  # record bytes, key bytes, offset, size


@dataclass(frozen=True)
class Commit:
    """One put recorded in a ring: ``key`` (as sent) stored at ``offset``, ``size`` bytes."""

    key: str
    offset: int
    size: int


class BadRecordError(Exception):
    """A ring holds a record that cannot be read (its writer is broken)."""


def record_bytes(key_bytes: int) -> int:
    """A record's size in the ring, for a key of ``key_bytes`` (UTF-8)."""
    return (_RECORD.size + key_bytes + 7) & ~7


class _Ring:
    def __init__(self, fd: int, path: str, mapping: mmap.mmap) -> None:
        self.path = path
        self._fd = fd
        self._map = mapping
        self.capacity = _HEADER.unpack_from(mapping, 0)[1]

    def _counter(self, at: int) -> int:
        value: int = _COUNTER.unpack_from(self._map, at)[0]
        return value

    def _copy_in(self, position: int, data: bytes) -> None:
        start = position % self.capacity
        first = min(len(data), self.capacity - start)
        self._map[_RECORDS + start:_RECORDS + start + first] = data[:first]
        self._map[_RECORDS:_RECORDS + len(data) - first] = data[first:]

    def _copy_out(self, position: int, nbytes: int) -> bytes:
        start = position % self.capacity
        first = min(nbytes, self.capacity - start)
        return self._map[_RECORDS + start:_RECORDS + start + first] + \
            self._map[_RECORDS:_RECORDS + nbytes - first]

    @property
    def revoked(self) -> bool:
        return self._counter(_REVOKED) != 0


class CommitRing(_Ring):
    """The master's side of one client's ring: created at ``path``, read by :meth:`take`."""

    def __init__(self, path: str, capacity: int) -> None:
        if capacity < 4096 or capacity % 8:
            raise InvalidParamsError(f"a commit ring holds at least 4096 bytes, a multiple "
                                     f"of 8; got {capacity}")
        fd, mapping = create_held(path, _RECORDS + capacity)
        _HEADER.pack_into(mapping, 0, MAGIC, capacity)
        super().__init__(fd, path, mapping)

    @property
    def pending(self) -> bool:
        return self._counter(_WRITTEN) != self._counter(_READ)

    def take(self) -> list[Commit]:
        """The records written since the last call, oldest first (marked read). Raises
        :class:`BadRecordError` if any cannot be read: the caller then revokes the ring."""
        read, written = self._counter(_READ), self._counter(_WRITTEN)
        if written - read > self.capacity or written < read:
            raise BadRecordError(f"ring counters out of range: read {read}, written {written}")
        commits = []
        while read < written:
            total, key_bytes, offset, size = _RECORD.unpack(self._copy_out(read, _RECORD.size))
            if total != record_bytes(key_bytes) or read + total > written:
                raise BadRecordError(f"record of {total} bytes with a key of {key_bytes} at {read}")
            key = self._copy_out(read + _RECORD.size, key_bytes)
            try:
                commits.append(Commit(key.decode(), offset, size))
            except UnicodeDecodeError:
                raise BadRecordError(f"record at {read}: key is not UTF-8") from None
            read += total
        _COUNTER.pack_into(self._map, _READ, read)
        return commits

    def revoke(self) -> None:
        """Tell the client to stop writing: what it writes now is never read."""
        _COUNTER.pack_into(self._map, _REVOKED, 1)

    def close(self) -> None:
        """Remove the ring (idempotent); its client finds the master gone."""
        remove_held(self.path, self._fd, self._map)


class CommitWriter(_Ring):
    """A client's side; raises ``OSError`` when ``path`` is no ring it can write."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, 0)
            magic, capacity = _HEADER.unpack_from(mapping, 0)
            if magic != MAGIC or len(mapping) != _RECORDS + capacity:
                mapping.close()
                raise OSError(f"{path} is not a kvcake commit ring")
        except (OSError, ValueError, struct.error):
            os.close(fd)
            raise
        super().__init__(fd, path, mapping)

    def usable(self) -> bool:
        """Whether records written now are read: the master lives, the ring is not revoked."""
        return not self.revoked and still_held(self._fd)

    def room(self) -> int:
        room: int = self.capacity - (self._counter(_WRITTEN) - self._counter(_READ))
        return room

    def append(self, commits: list[tuple[bytes, int, int]]) -> None:
        """Record ``(key, offset, size)`` puts, after their bytes are written; the caller
        checked :meth:`room`. The counter moves last: the master never sees half a record."""
        written = self._counter(_WRITTEN)
        position = written
        for key, offset, size in commits:
            total = record_bytes(len(key))
            self._copy_in(position, _RECORD.pack(total, len(key), offset, size) + key +
                          bytes(total - _RECORD.size - len(key)))
            position += total
        _COUNTER.pack_into(self._map, _WRITTEN, position)

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()
            os.close(self._fd)
