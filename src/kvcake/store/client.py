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

What each call does lives in :mod:`kvcake.store.ops` as a plan, which this client runs on
the engine's loop; :attr:`AsyncStore.blocking` runs the same plans in a caller's own thread
(Mooncake's synchronous API, :mod:`kvcake.store.compat`, goes that way).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TypeVar

from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError
from kvcake.common.log import get_logger
from kvcake.store.blocking import BlockingDriver
from kvcake.store.config import StoreConfig
from kvcake.store.node import NodeServer
from kvcake.store.ops import InPlaceValues, Range, Staging, StoreOps, check_lengths
from kvcake.store.pieces import as_bytes
from kvcake.store.replicate import AnyConfig
from kvcake.store.session import MasterSession
from kvcake.store.steps import Plan, drive
from kvcake.transfer import RemoteSegment, TransferEngine
from kvcake.transfer.config import TransferConfig
from kvcake.wire import store as m

log = get_logger(__name__)
T = TypeVar("T")

Buffer = bytes | bytearray | memoryview
__all__ = ["AsyncStore", "Buffer", "InPlaceValues", "Range", "Staging", "as_view"]


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
        self.session: MasterSession | None = None
        self.node = NodeServer(self.config, self.transfer_config.host)  # with segment_size
        self.ops = StoreOps(self._live, scratch_bytes)
        self.blocking = BlockingDriver(self._live)

    # ----- lifecycle
    async def setup(self) -> None:
        """Start the transfer engine, register with the master, mount our segment (if any)."""
        if self.engine is None:
            self.engine = await asyncio.to_thread(TransferEngine, self.transfer_config)
        self.session = MasterSession(self.config, self.engine.host_id,
                                     self.ops.master_restarted)
        mounts = await self.node.startup(self.engine, self.session.client_id)
        try:
            await self.session.start(mounts)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self.blocking.close()
        held = self.ops.arena.close()
        if self.session is not None:
            if held:
                await self.session.release_arena()
            await self.session.close()
            self.session = None
        await self.node.shutdown()
        if self.engine is not None and self._owns_engine:
            await asyncio.to_thread(self.engine.close)
        self.engine = None

    @property
    def _segments(self) -> dict[int, RemoteSegment]:
        """The peers' segments this client has reached, by segment id."""
        return self.ops.replicas.segments

    def _live(self) -> tuple[MasterSession, TransferEngine]:
        if self.session is None or self.engine is None:
            raise KvcakeError("store client is not set up (call setup())",
                              ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
        return self.session, self.engine

    async def _drive(self, plan: Plan[T]) -> T:
        try:
            session, engine = self._live()
        except KvcakeError:
            plan.close()
            raise
        return await drive(plan, session, engine)

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
        check_lengths(keys, views, "buffers")
        return await self.batch_put_parts(keys, [[v] for v in views], config)

    async def batch_put_parts(self, keys: Sequence[str], parts: Sequence[Sequence[memoryview]],
                              config: AnyConfig | None = None,
                              upsert: bool = False) -> list[int]:
        """See :meth:`kvcake.store.ops.StoreOps.put_parts`."""
        return await self._drive(self.ops.put_parts(keys, parts, config, upsert))

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
        return await self._drive(self.ops.get_values(keys, staging))

    async def batch_get_into(self, keys: Sequence[str],
                             views: Sequence[memoryview]) -> list[int]:
        """Read each key into its view; bytes read, or a negative code. A read that finishes
        after its lease ran out answers ``LEASE_EXPIRED``: its bytes may be stale."""
        check_lengths(keys, views, "buffers")
        return await self.batch_get_into_parts(keys, [[v] for v in views])

    async def batch_get_into_parts(self, keys: Sequence[str],
                                   parts: Sequence[Sequence[memoryview]]) -> list[int]:
        """See :meth:`kvcake.store.ops.StoreOps.get_into_parts`."""
        return await self._drive(self.ops.get_into_parts(keys, parts))

    async def batch_get_in_place(self, keys: Sequence[str]) -> InPlaceValues:
        """Each key's value where it lies, for a caller that copies it by itself: a view of
        its replica on this host, no copy (see :class:`InPlaceValues`)."""
        return await self._drive(self.ops.in_place(keys))

    async def attach_segments(self) -> None:
        """Reach every segment now (same-host ones mapped), not at the first read of each;
        best effort (what fails is left to the reads)."""
        await self._drive(self.ops.replicas.attach_all())

    async def read_ranges(self, ranges: Sequence[Range]) -> list[int]:
        """See :meth:`kvcake.store.ops.StoreOps.read_ranges`."""
        return await self._drive(self.ops.read_ranges(ranges))

    # ----- metadata
    async def is_exist(self, key: str) -> bool:
        code = (await self.batch_is_exist([key]))[0]
        _raise_code(key, min(code, 0))
        return code == 1

    async def batch_is_exist(self, keys: Sequence[str]) -> list[int]:
        """1 present, 0 absent, negative code for a bad key."""
        return await self._drive(self.ops.exist(keys))

    async def get_size(self, key: str) -> int:
        size = (await self.batch_get_size([key]))[0]
        _raise_code(key, min(size, 0))
        return size

    async def batch_get_size(self, keys: Sequence[str]) -> list[int]:
        return await self._drive(self.ops.sizes(keys))

    async def query_replicas(self, keys: Sequence[str]) -> m.QueryReplicasReply:
        """Every readable replica of each key, any tier (leases them, as a get does)."""
        return await self._drive(self.ops.query_replicas(keys))

    async def remove(self, key: str, force: bool = False) -> None:
        _raise_code(key, (await self.batch_remove([key], force))[0])

    async def batch_remove(self, keys: Sequence[str], force: bool = False) -> list[int]:
        return await self._drive(self.ops.remove(keys, force))

    async def remove_all(self, force: bool = False) -> int:
        return await self._drive(self.ops.remove_all(force))

    async def remove_by_regex(self, pattern: str, force: bool = False) -> int:
        """Remove this tenant's keys that ``pattern`` (Python ``re``) matches; how many."""
        return await self._drive(self.ops.remove_by_regex(pattern, force))

    async def replica_clear(self, keys: Sequence[str], segment_name: str = "") -> list[str]:
        """See :meth:`kvcake.store.ops.StoreOps.replica_clear`."""
        return await self._drive(self.ops.replica_clear(keys, segment_name))

    async def stats(self) -> m.Stats:
        return await self._drive(self.ops.stats())


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
