"""Caller memory the Mooncake-style API touches: buffers registered by address (for the
``*_from`` / ``*_into`` methods), and the local buffer that bytes values are staged through.

Mooncake copies a ``put``'s value into (and a ``get``'s out of) a local buffer of
``local_buffer_size`` bytes; a value that does not fit in what is free fails. kvcake moves
bytes straight from and to the caller's objects, but keeps the same budget (so
``local_buffer_size=0`` makes every bytes put and get fail, as in Mooncake), held for the
length of the call.
"""

from __future__ import annotations

import bisect
import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from kvcake.common.errors import InvalidParamsError


class BufferRegistry:
    """Registered ``(address, size)`` ranges, and views of memory inside them."""

    def __init__(self) -> None:
        self._buffers: list[tuple[int, int]] = []  # sorted by address
        self._whole: dict[tuple[int, int], memoryview] = {}  # made at a buffer's first view
        self._lock = threading.Lock()

    def register(self, address: int, size: int) -> None:
        if address <= 0 or size <= 0:
            raise InvalidParamsError(f"buffer {address:#x}+{size}: address and size must be > 0")
        with self._lock:
            bisect.insort(self._buffers, (address, size))

    def unregister(self, address: int) -> None:
        with self._lock:
            for index, (start, _) in enumerate(self._buffers):
                if start == address:
                    self._whole.pop(self._buffers.pop(index), None)
                    return
        raise InvalidParamsError(f"buffer {address:#x} is not registered")

    def capacity(self, address: int) -> int:
        """Bytes from ``address`` to the end of the registered buffer holding it (0: none)."""
        with self._lock:
            found = self._holding(address)
        return 0 if found is None else max(0, found[0] + found[1] - address)

    def _holding(self, address: int) -> tuple[int, int] | None:
        """The registered buffer ``address`` falls in or after (the caller holds the lock)."""
        index = bisect.bisect_right(self._buffers, (address, float("inf"))) - 1
        return self._buffers[index] if index >= 0 else None

    def view(self, address: int, size: int) -> memoryview:
        """``size`` bytes at ``address``, which must lie inside one registered buffer: a
        slice of a view of that whole buffer, made once."""
        if size <= 0 or address <= 0:
            raise InvalidParamsError(f"buffer {address:#x}+{size}: address and size must be > 0")
        with self._lock:
            found = self._holding(address)
            if found is None or address + size > found[0] + found[1]:
                raise InvalidParamsError(f"buffer {address:#x}+{size} is not inside a "
                                         "registered buffer (call register_buffer first)")
            whole = self._whole.get(found)
            if whole is None:
                whole = self._whole[found] = memoryview(
                    (ctypes.c_ubyte * found[1]).from_address(found[0])).cast("B")
        return whole[address - found[0]:address - found[0] + size]

    def views(self, addresses: list[int], sizes: list[int]) -> list[memoryview]:
        if len(addresses) != len(sizes):
            raise InvalidParamsError(f"{len(addresses)} buffers but {len(sizes)} sizes")
        return [self.view(a, s) for a, s in zip(addresses, sizes, strict=True)]


class LocalBuffer:
    """A byte budget of ``capacity``: staged values take from it and give back."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._used = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if self._used + nbytes > self.capacity:
                return False
            self._used += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes
            assert self._used >= 0, "local buffer given back more than it lent"

    @contextmanager
    def staged(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` for the block; ``InvalidParamsError`` when they do not fit."""
        if not self.take(nbytes):
            raise InvalidParamsError(f"{nbytes} bytes do not fit in the local buffer "
                                     f"({self.capacity} bytes, setup's local_buffer_size)")
        try:
            yield
        finally:
            self.give(nbytes)
