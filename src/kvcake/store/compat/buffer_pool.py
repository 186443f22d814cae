"""Mooncake's ``BufferPool``: leases of memory already registered with a store, for the
``*_from`` / ``*_into`` methods, so a caller never registers (or frees) buffers itself.

A pool hands out *regions*, each its own anonymous mapping, pre-touched when created (first
touch of fresh pages costs more than the copy into them), registered with the store's
``register_buffer`` and unregistered when the region is dropped::

    size ─▶ size class ─▶ an idle region of that class (reuse)
                     └──▶ else a new region, when the byte budget and max_regions allow
                     └──▶ else wait (block_on_exhaustion / block) until a release, or raise

================  ========================================================================
size class        ``max(size, 1)`` rounded up to a power of two, at least
                  ``min_size_class``, at most ``max_size_class``; larger sizes are
                  *oversize*: exact, their region is dropped on release
budget            regions alive (idle + leased + being made) hold at most ``max_bytes``;
                  ``0`` means twice the store's ``local_buffer_size`` (Mooncake's default),
                  a smaller value is raised to ``local_buffer_size``; idle regions are
                  dropped to make room for a new one
max_regions       at most this many leased regions at once (``None``: no limit)
release           the region goes back to its class's idle list (Mooncake frees it to its
                  allocator); refused while a view from ``lease.buffer`` is alive
local buffer      a lease holds its bytes of the store's local-buffer budget while they
                  fit, as Mooncake carves leases from that buffer first (bytes ``put`` /
                  ``get`` then see less room)
prewarm           makes idle regions ahead of use (Mooncake's is a no-op)
close             drops idle regions; refused while a lease is out
================  ========================================================================

Errors are :class:`BufferPoolError`, a ``RuntimeError`` as Mooncake's are.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
import time
import weakref
from types import TracebackType

from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.store.compat.zero_copy import ZeroCopyApi

KiB, MiB = 1 << 10, 1 << 20


class BufferPoolError(KvcakeError, RuntimeError):
    """A pool refused: exhausted, timed out, closed, misconfigured, or a lease still in use."""

    default_code = ErrorCode.INVALID_PARAMS


class _Region:
    """``size`` pre-touched bytes at ``ptr`` (a multiple of ``alignment``)."""

    def __init__(self, size: int, alignment: int) -> None:
        self._map = mmap.mmap(-1, size + max(0, alignment - mmap.PAGESIZE))
        anchor = ctypes.c_char.from_buffer(self._map)
        base = ctypes.addressof(anchor)
        del anchor  # an export would keep the mapping from closing
        self.ptr = -(-base // alignment) * alignment
        self.size = size
        ctypes.memset(self.ptr, 0, size)

    def free(self) -> None:
        self._map.close()


class BufferLease:
    """One acquired region: ``ptr`` and ``size`` for ``put_from`` / ``get_into``, ``buffer``
    to read and write it from Python. ``release()`` (or leaving a ``with`` block, or dropping
    the lease) gives it back; releasing twice does nothing."""

    def __init__(self, pool: BufferPool, region: _Region, size: int, local: int) -> None:
        self._pool: BufferPool | None = pool
        self._region = region
        self._size = size
        self._local = local  # bytes of the store's local-buffer budget held
        self._views: list[weakref.ref[ctypes.Array[ctypes.c_ubyte]]] = []

    @property
    def ptr(self) -> int:
        self._check_live()
        return self._region.ptr

    @property
    def size(self) -> int:
        return self._size

    @property
    def buffer(self) -> memoryview:
        """A writable byte view of the ``size`` leased bytes; it keeps the lease alive, and
        ``release()`` is refused while it (or a slice of it) is."""
        self._check_live()
        carrier = (ctypes.c_ubyte * self._size).from_address(self._region.ptr)
        carrier.lease = self  # type: ignore[attr-defined]  # as Mooncake's view holds it
        self._views.append(weakref.ref(carrier))
        return memoryview(carrier).cast("B")

    def release(self) -> None:
        if any(ref() is not None for ref in self._views):
            raise BufferPoolError("cannot release buffer while exported views exist",
                                  ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
        self._give_back()

    def _give_back(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._give_back(self._region, self._local)

    def _check_live(self) -> None:
        if self._pool is None:
            raise BufferPoolError("buffer lease is closed", ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)

    def __enter__(self) -> BufferLease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:
        # no view can be alive here: each one holds the lease; a finalizer must not raise
        with contextlib.suppress(Exception):
            self._give_back()


class BufferPool:
    """See the module docstring; arguments as Mooncake's ``BufferPool``."""

    def __init__(self, store: ZeroCopyApi, max_bytes: int = 0, min_size_class: int = 64 * KiB,
                 max_size_class: int | None = None, alignment: int = 8 * MiB,
                 block_on_exhaustion: bool = True, default_timeout: float | None = None,
                 max_regions: int | None = None, prewarm_size: int | None = None,
                 prewarm_count: int = 0) -> None:
        local = _local_capacity(store)
        _check_shape(min_size_class, alignment)
        self._store = store
        self._max_bytes = max(max_bytes, local) if max_bytes else 2 * local
        self._min_size_class = min_size_class
        self._max_size_class = self._max_bytes if max_size_class is None else max_size_class
        self._alignment = alignment
        self._block = block_on_exhaustion
        self._default_timeout = default_timeout
        self._max_regions = max_regions
        self._cond = threading.Condition()
        self._idle: dict[int, list[_Region]] = {}  # size class -> regions
        self._leased: dict[int, _Region] = {}  # ptr -> region
        self._bytes = 0  # idle + leased + reserved
        self._reserved = 0  # regions being made
        self._closed = False
        if prewarm_size is not None and prewarm_count > 0:
            self.prewarm(prewarm_size, prewarm_count)

    # ----- the API
    def acquire(self, size: int, block: bool | None = None,
                timeout: float | None = None) -> BufferLease:
        """A lease of ``size`` bytes; ``BufferPoolError`` when the pool cannot hold them,
        is exhausted and may not wait (``block`` / ``block_on_exhaustion``), the wait passed
        ``timeout`` seconds (``default_timeout``), or it is closed."""
        size_class = self._size_class(size)
        deadline = _deadline(self._default_timeout if timeout is None else timeout)
        should_block = self._block if block is None else block
        with self._cond:
            while True:
                self._check_open()
                region = self._take_idle(size_class) or self._make(size_class)
                if region is not None:
                    return self._lease(region, size)
                self._wait(should_block, deadline)

    def buffer(self, size: int, block: bool | None = None,
               timeout: float | None = None) -> BufferLease:
        return self.acquire(size, block, timeout)

    def prewarm(self, size: int, count: int) -> int:
        """Make up to ``count`` idle regions of ``size``'s class, as the budget allows; how
        many it made."""
        size_class = self._size_class(size)
        made = 0
        with self._cond:
            for _ in range(count):
                self._check_open()
                region = self._make(size_class, evict=False)
                if region is None:
                    break
                self._park(region)
                made += 1
        return made

    def close(self) -> None:
        """Unregister and free the idle regions; ``BufferPoolError`` while a lease is out."""
        with self._cond:
            if self._closed:
                return
            self._cond.wait_for(lambda: self._reserved == 0)
            if self._leased:
                raise BufferPoolError("cannot close buffer pool with active leases",
                                      ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
            while self._evict_one():
                pass
            self._closed = True
            self._cond.notify_all()

    def __del__(self) -> None:
        # no lease is out (each holds its pool): unregister what is idle, as Mooncake's
        # destructor closes; a finalizer must not raise
        with contextlib.suppress(Exception):
            self.close()

    # ----- regions (called with self._cond held)
    def _size_class(self, size: int) -> int:
        size = max(size, 1)
        if size > self._max_bytes:
            raise BufferPoolError(f"requested buffer size {size} exceeds pool capacity "
                                  f"({self._max_bytes} bytes)")
        if size > self._max_size_class:
            return size  # oversize: exact
        rounded = max(self._min_size_class, 1 << (size - 1).bit_length())
        return min(rounded, self._max_size_class, self._max_bytes)

    def _take_idle(self, size_class: int) -> _Region | None:
        if self._at_region_limit():
            return None
        idle = self._idle.get(size_class)
        return idle.pop() if idle else None

    def _make(self, size_class: int, evict: bool = True) -> _Region | None:
        """A new registered region, made outside the lock once its bytes are reserved;
        ``None`` when the budget or ``max_regions`` has no room for it."""
        if self._at_region_limit():
            return None
        while self._bytes + size_class > self._max_bytes and evict and self._evict_one():
            pass
        if self._bytes + size_class > self._max_bytes:
            return None
        self._bytes += size_class
        self._reserved += 1
        self._cond.release()
        region = None
        try:
            region = self._register(_Region(size_class, self._alignment))
        finally:
            self._cond.acquire()
            self._reserved -= 1
            if region is None:
                self._bytes -= size_class
            self._cond.notify_all()
        if self._closed:  # closed while it was being made
            self._drop(region)
            self._check_open()
        return region

    def _register(self, region: _Region) -> _Region:
        code = self._store.register_buffer(region.ptr, region.size)
        if code != 0:
            region.free()
            raise BufferPoolError(f"registering {region.size} bytes failed ({code})",
                                  ErrorCode.INTERNAL_ERROR)
        return region

    def _drop(self, region: _Region) -> None:
        self._store.unregister_buffer(region.ptr)  # fails only if someone else did it
        region.free()
        self._bytes -= region.size

    def _evict_one(self) -> bool:
        for idle in self._idle.values():
            if idle:
                self._drop(idle.pop())
                return True
        return False

    def _park(self, region: _Region) -> None:
        self._idle.setdefault(region.size, []).append(region)

    def _lease(self, region: _Region, size: int) -> BufferLease:
        self._leased[region.ptr] = region
        local = region.size if self._store._local.take(region.size) else 0
        return BufferLease(self, region, size, local)

    def _give_back(self, region: _Region, local: int) -> None:
        with self._cond:
            if local:
                self._store._local.give(local)
            del self._leased[region.ptr]
            if self._closed or region.size > self._max_size_class:
                self._drop(region)
            else:
                self._park(region)
            self._cond.notify_all()

    def _at_region_limit(self) -> bool:
        return self._max_regions is not None \
            and len(self._leased) + self._reserved >= self._max_regions

    def _wait(self, should_block: bool, deadline: float | None) -> None:
        if not should_block:
            raise BufferPoolError("buffer pool is exhausted", ErrorCode.NO_AVAILABLE_HANDLE)
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise BufferPoolError("timed out waiting for buffer", ErrorCode.NO_AVAILABLE_HANDLE)
        self._cond.wait(remaining)

    def _check_open(self) -> None:
        if self._closed:
            raise BufferPoolError("buffer pool is closed", ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)


def _local_capacity(store: ZeroCopyApi) -> int:
    if not isinstance(store, ZeroCopyApi) or store._store is None:
        raise BufferPoolError("MooncakeDistributedStore is not initialized")
    if store._local.capacity <= 0:
        raise BufferPoolError("BufferPool requires a store configured with a local buffer")
    return store._local.capacity


def _check_shape(min_size_class: int, alignment: int) -> None:
    if min_size_class <= 0 or alignment <= 0:
        raise BufferPoolError("min_size_class and alignment must be positive")
    if alignment < ctypes.sizeof(ctypes.c_void_p) or alignment & (alignment - 1):
        raise BufferPoolError(f"alignment {alignment} must be a power of two and at least "
                              f"{ctypes.sizeof(ctypes.c_void_p)}")


def _deadline(timeout: float | None) -> float | None:
    if timeout is not None and timeout < 0:
        raise BufferPoolError(f"timeout must be non-negative (got {timeout})")
    return None if timeout is None else time.monotonic() + timeout
