"""The native asyncio store client (and, with ``segment_size``, a storage node).

::

    store = AsyncStore(StoreConfig(master="127.0.0.1:50051"))
    await store.setup()
    await store.put("k", b"bytes")               # two-phase: put_start, write, put_end
    n = await store.get_into("k", view)          # one copy: replica -> view
    await store.close()

Bytes move with the transfer engine: same-host replicas through ``shm`` (a memcpy from the
node's mapping straight into the caller's buffer), others over ``tcp`` (received straight
into it). A value may come from or go to several buffers (``*_parts``), or be read in byte
ranges (:meth:`AsyncStore.read_ranges`); see :mod:`kvcake.store.pieces`. Batch methods
answer one int per key (bytes or 0 on success, a negative Mooncake code on failure);
single-key methods raise :class:`KvcakeError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError
from kvcake.common.log import get_logger
from kvcake.store.config import StoreConfig
from kvcake.store.node import NodeServer
from kvcake.store.pieces import Piece, as_bytes, check_parts, concatenated, lay_out
from kvcake.store.replica_io import ReplicaIo, shifted
from kvcake.store.replicate import AnyConfig, as_wire
from kvcake.store.session import MasterSession
from kvcake.transfer import MappedRange, RemoteSegment, TransferEngine, TransferOp
from kvcake.transfer.config import TransferConfig
from kvcake.wire import store as m

log = get_logger(__name__)

Buffer = bytes | bytearray | memoryview
Range = tuple[str, int, memoryview]  # key, offset in its value, destination


class Staging(Protocol):
    """A byte budget values are read through (Mooncake's local buffer)."""

    def take(self, nbytes: int) -> bool: ...
    def give(self, nbytes: int) -> None: ...


@dataclass(frozen=True)
class InPlaceValues:
    """Values read where they lie. ``ranges[i]`` maps key ``i``'s replica on this host
    (``None``: missing, ``codes[i]`` says why, or no replica here: read it with a copy).
    Bytes read through them count only if :meth:`fresh` holds once read: every lease still
    held (the bytes were not freed and reused meanwhile) and every owner alive."""

    codes: list[int]
    ranges: list[MappedRange | None]
    deadline: float

    def fresh(self) -> bool:
        owners = {mapped.owner_alive for mapped in self.ranges if mapped is not None}
        return time.monotonic() <= self.deadline and all(alive() for alive in owners)


def as_view(value: Buffer) -> memoryview:
    return as_bytes(memoryview(value))


class AsyncStore:
    def __init__(self, config: StoreConfig | None = None,
                 transfer: TransferConfig | None = None,
                 engine: TransferEngine | None = None, scratch_bytes: int = 0) -> None:
        """``engine``: use (and leave open) this transfer engine instead of starting one.
        ``scratch_bytes``: a pre-touched buffer that :meth:`get` receives into before its
        one copy into ``bytes`` (fresh memory is slow to touch the first time)."""
        self.config = config or StoreConfig()
        self.transfer_config = transfer or TransferConfig()
        self.engine: TransferEngine | None = engine
        self._owns_engine = engine is None
        self._scratch = memoryview(bytearray(1) * scratch_bytes)  # filled, so pre-touched
        self._scratch_busy = False
        self.session: MasterSession | None = None
        self.node = NodeServer(self.config, self.transfer_config.host)  # with segment_size
        self._io = ReplicaIo(self._live)

    # ----- lifecycle
    async def setup(self) -> None:
        """Start the transfer engine, register with the master, mount our segment (if any)."""
        if self.engine is None:
            self.engine = await asyncio.to_thread(TransferEngine, self.transfer_config)
        self.session = MasterSession(self.config, self.engine.host_id,
                                     self._io.segments.clear)
        mounts = await self.node.startup(self.engine, self.session.client_id)
        try:
            await self.session.start(mounts)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        await self.node.shutdown()
        if self.engine is not None and self._owns_engine:
            await asyncio.to_thread(self.engine.close)
        self.engine = None

    @property
    def _segments(self) -> dict[int, RemoteSegment]:
        """The peers' segments this client has reached, by segment id."""
        return self._io.segments

    def _live(self) -> tuple[MasterSession, TransferEngine]:
        if self.session is None or self.engine is None:
            raise KvcakeError("store client is not set up (call setup())",
                              ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
        return self.session, self.engine

    # ----- writes
    async def put(self, key: str, value: Buffer, config: AnyConfig | None = None) -> None:
        _raise_code(key, (await self.batch_put_from([key], [as_view(value)], config))[0])

    async def put_from(self, key: str, view: memoryview, config: AnyConfig | None = None) -> None:
        await self.put(key, view, config)

    async def upsert(self, key: str, value: Buffer, config: AnyConfig | None = None) -> None:
        """Store ``value`` under ``key``, replacing what is there (see
        :meth:`batch_put_parts`)."""
        codes = await self.batch_put_parts([key], [[as_view(value)]], config, upsert=True)
        _raise_code(key, codes[0])

    async def put_batch(self, keys: Sequence[str], values: Sequence[Buffer],
                        config: AnyConfig | None = None) -> list[int]:
        return await self.batch_put_from(keys, [as_view(v) for v in values], config)

    async def batch_put_from(self, keys: Sequence[str], views: Sequence[memoryview],
                             config: AnyConfig | None = None) -> list[int]:
        """Insert-if-absent each key; 0 when stored (or already there), else a code."""
        if len(keys) != len(views):
            raise InvalidParamsError(f"{len(keys)} keys but {len(views)} buffers")
        return await self.batch_put_parts(keys, [[v] for v in views], config)

    async def batch_put_parts(self, keys: Sequence[str], parts: Sequence[Sequence[memoryview]],
                              config: AnyConfig | None = None,
                              upsert: bool = False) -> list[int]:
        """Store each key's value, the concatenation of its ``parts``; 0 when stored, else a
        code. Without ``upsert`` a key that exists is kept (and answers 0: nothing to
        write); with it, it is replaced (its group and pins carried over, see
        :mod:`kvcake.store.master.puts`)."""
        session, _ = self._live()
        check_parts(keys, parts)
        sizes = [sum(v.nbytes for v in views) for views in parts]
        started = await session.call(m.PutStart(session.client_id, list(keys), sizes,
                                                as_wire(config, len(keys)), upsert),
                                     m.PutStartReply)
        codes = [0 if c == ErrorCode.OBJECT_ALREADY_EXISTS else c for c in started.codes]
        todo = [i for i, c in enumerate(started.codes) if c == 0]
        writes = [(i, shifted(h, offset), view) for i in todo for h in started.replicas[i]
                  for offset, view in concatenated(parts[i])]
        failed = await self._io.move(TransferOp.WRITE, [(h, v) for _, h, v in writes])
        bad = {writes[j][0] for j in failed}
        for i in bad:
            codes[i] = ErrorCode.TRANSFER_FAIL
        await self._finish_puts(session, [keys[i] for i in todo if i not in bad],
                                [keys[i] for i in sorted(bad)], codes, keys)
        return codes

    async def _finish_puts(self, session: MasterSession, done: list[str], revoked: list[str],
                           codes: list[int], keys: Sequence[str]) -> None:
        index = {key: i for i, key in enumerate(keys)}
        if done:
            ended = await session.call(m.PutEnd(session.client_id, done), m.CodesReply)
            for key, code in zip(done, ended.codes, strict=True):
                codes[index[key]] = code
        if revoked:
            await session.call(m.PutRevoke(session.client_id, revoked), m.CodesReply)

    # ----- reads
    async def get(self, key: str) -> bytes:
        value = (await self.get_batch([key]))[0]
        if isinstance(value, int):
            _raise_code(key, value)
        assert isinstance(value, bytes)
        return value

    async def get_into(self, key: str, view: memoryview) -> int:
        result = (await self.batch_get_into([key], [view]))[0]
        _raise_code(key, result)
        return result

    async def get_batch(self, keys: Sequence[str],
                        staging: Staging | None = None) -> list[bytes | int]:
        """Each key's bytes, or its negative code; one master round trip for all. With
        ``staging``, a value it has no room for answers ``INVALID_PARAMS``."""
        found, deadline = await self._find(keys)
        taken = _stage(found, staging)
        total = sum(s for c, s in zip(found.codes, found.sizes, strict=True) if c == 0)
        use_scratch = not self._scratch_busy and total <= self._scratch.nbytes
        self._scratch_busy |= use_scratch
        try:
            views = self._value_views(found, use_scratch)
            results = await self._read_found(found, [[v] for v in views], deadline)
            return [bytes(v) if r >= 0 else r for v, r in zip(views, results, strict=True)]
        finally:
            self._scratch_busy &= not use_scratch
            if staging is not None:
                staging.give(taken)

    def _value_views(self, found: m.GetReplicasReply, use_scratch: bool) -> list[memoryview]:
        views, position = [], 0
        for code, size in zip(found.codes, found.sizes, strict=True):
            length = size if code == 0 else 0
            if use_scratch:
                views.append(self._scratch[position : position + length])
                position += length
            else:
                views.append(memoryview(bytearray(length)))
        return views

    async def batch_get_into(self, keys: Sequence[str],
                             views: Sequence[memoryview]) -> list[int]:
        """Read each key into its view; bytes read, or a negative code. A read that finishes
        after its lease ran out answers ``LEASE_EXPIRED``: its bytes may be stale."""
        if len(keys) != len(views):
            raise InvalidParamsError(f"{len(keys)} keys but {len(views)} buffers")
        return await self.batch_get_into_parts(keys, [[v] for v in views])

    async def batch_get_into_parts(self, keys: Sequence[str],
                                   parts: Sequence[Sequence[memoryview]]) -> list[int]:
        """Read each key's value into its ``parts`` in order (the last ones may stay
        unused); bytes read, or a code (``BUFFER_OVERFLOW`` when they hold less)."""
        self._live()
        check_parts(keys, parts)
        found, deadline = await self._find(keys)
        return await self._read_found(found, parts, deadline)

    async def batch_get_in_place(self, keys: Sequence[str]) -> InPlaceValues:
        """Each key's value where it lies, for a caller that copies it by itself: a view of
        its replica on this host, no copy (see :class:`InPlaceValues`)."""
        self._live()
        found, deadline = await self._find(keys)
        return InPlaceValues(list(found.codes), await self._io.mapped(found), deadline)

    async def attach_segments(self) -> None:
        """Reach every segment now (same-host ones mapped), not at the first read of each;
        best effort (what fails is left to the reads)."""
        self._live()
        await self._io.attach_all()

    async def read_ranges(self, ranges: Sequence[Range]) -> list[int]:
        """Read byte ranges of values: each ``(key, offset, view)`` fills ``view`` from the
        value's byte ``offset``; bytes read, or a code (``INVALID_PARAMS`` for a range past
        the value's end). One master round trip for all keys."""
        keys = list(dict.fromkeys(key for key, _, _ in ranges))
        found, deadline = await self._find(keys)
        index = {key: i for i, key in enumerate(keys)}
        results: list[int] = [0] * len(ranges)
        pieces: dict[int, list[Piece]] = {}
        owners: dict[int, list[int]] = {}
        for j, (key, offset, view) in enumerate(ranges):
            i = index[key]
            if found.codes[i] != 0 or offset < 0 or offset + view.nbytes > found.sizes[i]:
                results[j] = found.codes[i] or ErrorCode.INVALID_PARAMS
                continue
            if not view.nbytes:
                continue  # nothing to move: 0 bytes read
            pieces.setdefault(i, []).append((offset, view))
            owners.setdefault(i, []).append(j)
        codes = await self._io.read(found, pieces, deadline)
        for i, js in owners.items():
            for j in js:
                results[j] = codes[i] or ranges[j][2].nbytes
        return results

    async def _find(self, keys: Sequence[str]) -> tuple[m.GetReplicasReply, float]:
        """Replicas (leased) of ``keys``, and the time their leases run out."""
        session, _ = self._live()
        deadline = time.monotonic()
        found = await session.call(m.GetReplicas(list(keys), session.client_id),
                                   m.GetReplicasReply)
        return found, deadline + found.waited_s + found.lease_ttl_s  # leased no earlier

    async def _read_found(self, found: m.GetReplicasReply,
                          parts: Sequence[Sequence[memoryview]], deadline: float) -> list[int]:
        results = list(found.codes)
        pieces: dict[int, list[Piece]] = {}
        for i, (code, size) in enumerate(zip(found.codes, found.sizes, strict=True)):
            laid = lay_out(parts[i], size) if code == 0 else None
            if code == 0 and laid is None:
                results[i] = ErrorCode.BUFFER_OVERFLOW
            elif laid is not None:
                pieces[i] = laid
        codes = await self._io.read(found, pieces, deadline)
        return [codes[i] or found.sizes[i] if i in pieces else int(c)
                for i, c in enumerate(results)]

    # ----- metadata
    async def is_exist(self, key: str) -> bool:
        code = (await self.batch_is_exist([key]))[0]
        _raise_code(key, min(code, 0))
        return code == 1

    async def batch_is_exist(self, keys: Sequence[str]) -> list[int]:
        """1 present, 0 absent, negative code for a bad key."""
        session, _ = self._live()
        return (await session.call(m.Exist(list(keys), session.client_id), m.CodesReply)).codes

    async def get_size(self, key: str) -> int:
        size = (await self.batch_get_size([key]))[0]
        _raise_code(key, min(size, 0))
        return size

    async def batch_get_size(self, keys: Sequence[str]) -> list[int]:
        found, _ = await self._find(keys)
        return [s if c == 0 else c for c, s in zip(found.codes, found.sizes, strict=True)]

    async def query_replicas(self, keys: Sequence[str]) -> m.QueryReplicasReply:
        """Every readable replica of each key, any tier (leases them, as a get does)."""
        session, _ = self._live()
        return await session.call(m.QueryReplicas(list(keys), session.client_id),
                                  m.QueryReplicasReply)

    async def remove(self, key: str, force: bool = False) -> None:
        _raise_code(key, (await self.batch_remove([key], force))[0])

    async def batch_remove(self, keys: Sequence[str], force: bool = False) -> list[int]:
        session, _ = self._live()
        request = m.Remove(list(keys), force, session.client_id)
        return (await session.call(request, m.CodesReply)).codes

    async def remove_all(self, force: bool = False) -> int:
        session, _ = self._live()
        return (await session.call(m.RemoveAll(force, session.client_id), m.CountReply)).count

    async def remove_by_regex(self, pattern: str, force: bool = False) -> int:
        """Remove this tenant's keys that ``pattern`` (Python ``re``) matches; how many."""
        session, _ = self._live()
        request = m.RemoveByRegex(pattern, force, session.client_id)
        return (await session.call(request, m.CountReply)).count

    async def replica_clear(self, keys: Sequence[str], segment_name: str = "") -> list[str]:
        """Drop this client's own objects among ``keys`` whose lease ran out (all replicas,
        or those on segments named ``segment_name``); the keys dropped."""
        session, _ = self._live()
        request = m.ReplicaClear(list(keys), segment_name, session.client_id)
        return (await session.call(request, m.KeysReply)).keys

    async def stats(self) -> m.Stats:
        session, _ = self._live()
        return await session.call(m.GetStats(), m.Stats)


def _stage(found: m.GetReplicasReply, staging: Staging | None) -> int:
    """Take room for each found value from ``staging``; a value without room becomes
    ``INVALID_PARAMS`` (in ``found.codes``). The bytes taken."""
    taken = 0
    for i, (code, size) in enumerate(zip(found.codes, found.sizes, strict=True)):
        if code == 0 and staging is not None:
            if staging.take(size):
                taken += size
            else:
                found.codes[i] = ErrorCode.INVALID_PARAMS
    return taken


def _raise_code(key: str, code: int) -> None:
    if code >= 0:
        return
    try:
        known = ErrorCode(code)
    except ValueError:
        raise KvcakeError(f"{key!r}: unknown error code {code}") from None
    text = _MESSAGES.get(known, known.name.lower().replace("_", " "))
    error = InvalidParamsError if known in _CALLER_FAULTS else KvcakeError
    raise error(f"{key!r}: {text}", known)


_CALLER_FAULTS = {ErrorCode.INVALID_KEY, ErrorCode.INVALID_PARAMS, ErrorCode.BUFFER_OVERFLOW}
_MESSAGES = {
    ErrorCode.OBJECT_NOT_FOUND: "no such object",
    ErrorCode.BUFFER_OVERFLOW: "buffer is smaller than the object",
    ErrorCode.NO_AVAILABLE_HANDLE: "no segment has room for the object",
    ErrorCode.LEASE_EXPIRED: "read outlived its lease; the bytes may be stale",
    ErrorCode.OBJECT_HAS_LEASE: "object is leased by a reader; retry later or force",
    ErrorCode.INVALID_KEY: "key is empty or too long",
    ErrorCode.INVALID_PARAMS: "size is 0 or larger than any mounted segment, or bad config",
}
