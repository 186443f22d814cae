"""Reads that skip the master: a client on the master's host finds keys in the master's
location table (:mod:`kvcake.store.locations`) and copies their values from its mapping of
the segment, then checks that nothing changed meanwhile::

    find every key in the table ─ a miss ──────────────────> ask the master, as before
      │ all found, each on a segment mapped here
    copy each value (or only answer "present")
      │ a slot changed, or a segment's owner died ─────────> ask the master, as before
    answer; tell the master which keys were read, without waiting (leases, eviction order)

Each method answers ``None`` where the master must be asked; nothing is half done then.
The master is told of a key again only once half its lease has passed since the last time
(:meth:`TableReads.to_touch`): a key read over and over keeps a lease of at least half the
master's ``lease_ttl_s`` from each read, and costs no message per read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvcake.common.errors import ErrorCode
from kvcake.store.locations import Location, LocationReader
from kvcake.store.master.tenants import scoped_key
from kvcake.store.pieces import lay_out
from kvcake.store.replica_io import Live, ReplicaIo
from kvcake.transfer import MappedRange

if TYPE_CHECKING:
    from kvcake.store.ops import Staging

Found = list[tuple[Location, MappedRange]]
_TOLD_KEYS = 1 << 16  # keys whose last lease time is kept; forgotten all at once beyond


class TableReads:
    """``live()``: the session and engine; ``replicas``: the segments reached so far."""

    def __init__(self, live: Live, replicas: ReplicaIo) -> None:
        self._live = live
        self._replicas = replicas
        self._reader: LocationReader | None = None
        self._opening = threading.Lock()
        self._told: dict[str, float] = {}  # key -> when the master last leased it for us

    def to_touch(self, keys: Sequence[str]) -> list[str]:
        """The keys answered from the table whose lease the master should renew now: those
        not leased for this client within the last half lease."""
        now, renew_before = self._renew_before()
        told = self._told
        if len(told) > _TOLD_KEYS:
            told.clear()
        due = [key for key in keys if told.get(key, -1.0) < renew_before]
        for key in due:
            told[key] = now
        return due

    def due(self, key: str) -> bool:
        """Whether reading ``key`` now must renew its lease (:meth:`to_touch` would name
        it); nothing is marked."""
        return self._told.get(key, -1.0) < self._renew_before()[1]

    def _renew_before(self) -> tuple[float, float]:
        """Now, and the time before which a lease for this client is due to be renewed."""
        session, _ = self._live()
        now = time.monotonic()
        return now, now - session.lease_ttl_s / 2

    def exist(self, keys: Sequence[str]) -> list[int] | None:
        """1 per key, when the table holds every one of them."""
        session, _ = self._live()
        reader = self._table(session.locations)
        tenant = session.config.tenant
        if reader is None or any(not isinstance(key, str) or  # refused by name, asking
                                 reader.find(scoped_key(tenant, key)) is None for key in keys):
            return None
        return [1] * len(keys)

    def values(self, keys: Sequence[str], take: Staged) -> list[bytes | int] | None:
        """Each value's bytes (``INVALID_PARAMS`` for one ``take`` has no room for)."""
        found = self._found(keys)
        if found is None:
            return None
        reader, located = found
        with take:
            values: list[bytes | int] = [
                bytes(mapped.view) if take(location.size) else int(ErrorCode.INVALID_PARAMS)
                for location, mapped in located]
        return values if _unchanged(reader, located) else None

    def into(self, keys: Sequence[str], parts: Sequence[Sequence[memoryview]]
             ) -> list[int] | None:
        """Each value copied into its ``parts``: bytes read, or ``BUFFER_OVERFLOW``."""
        found = self._found(keys)
        if found is None:
            return None
        reader, located = found
        results = []
        for (location, mapped), views in zip(located, parts, strict=True):
            pieces = lay_out(views, location.size)
            if pieces is None:
                results.append(int(ErrorCode.BUFFER_OVERFLOW))
                continue
            for offset, view in pieces:
                view[:] = mapped.view[offset:offset + view.nbytes]
            results.append(location.size)
        return results if _unchanged(reader, located) else None

    def _found(self, keys: Sequence[str]) -> tuple[LocationReader, Found] | None:
        """Every key's slot and its value's bytes as mapped here; ``None`` at the first key
        the table lacks or whose segment this process has not mapped."""
        session, engine = self._live()
        reader = self._table(session.locations)
        if reader is None:
            return None
        tenant, segments = session.config.tenant, self._replicas.segments
        located = []
        for key in keys:
            if not isinstance(key, str):
                return None  # refused by name, asking the master
            location = reader.find(scoped_key(tenant, key))
            if location is None or not location.mapped_here:
                return None
            segment = segments.get(location.segment_id)
            mapped = segment and engine.map_range(segment, location.offset, location.size)
            if not mapped:
                return None
            located.append((location, mapped))
        return reader, located

    def _table(self, path: str) -> LocationReader | None:
        """The table at ``path`` (the joined master's), while that master lives."""
        reader = self._reader
        if reader is None or reader.path != path:
            reader = self._open(path)
        return reader if reader is not None and reader.alive() else None

    def _open(self, path: str) -> LocationReader | None:
        with self._opening:
            reader = self._reader
            if reader is not None and reader.path == path:
                return reader
            try:
                reader = LocationReader(path) if path else None
            except OSError:
                reader = None  # not readable from here (another user's master, say)
            self._reader = reader  # the one before is closed once no thread reads it
            self._told.clear()  # leases from another master
            return reader


class Staged:
    """A byte budget held while values are copied (Mooncake's local buffer): call it with
    a size to take that much; everything taken is given back on leaving the ``with``."""

    def __init__(self, budget: Staging | None = None) -> None:
        self._budget = budget
        self._taken = 0

    def __call__(self, nbytes: int) -> bool:
        budget = self._budget
        if budget is None:
            return True
        if not budget.take(nbytes):
            return False
        self._taken += nbytes
        return True

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *_: object) -> None:
        if self._budget is not None and self._taken:
            self._budget.give(self._taken)
            self._taken = 0


def _unchanged(reader: LocationReader, located: Found) -> bool:
    """Whether the bytes read are still the keys' values: no slot rewritten meanwhile (a
    removal, eviction or replacement rewrites it before the memory can be reused), every
    segment's owner alive."""
    return all(reader.unchanged(location) and mapped.owner_alive()
               for location, mapped in located)
