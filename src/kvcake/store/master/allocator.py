"""Space inside one mounted segment: a two-level segregated-fit allocator.

The master places every replica with this; it never touches the bytes. KV objects range
from KiB to tens of MiB and churn constantly, so the allocator must stay O(1)-ish and not
fragment into uselessness:

* Space is counted in 64-byte granules. Free blocks sit in size-class bins: exact classes
  below 8 granules, then 8 classes per power of two (at most 12.5 % slack per class).
* ``allocate`` rounds the request up to the next class boundary, so *any* block of a bin at
  or above it fits; a bitmap of non-empty bins finds the first one in one big-int step.
  Only when nothing above is free does it scan the request's own bin (good fit when full).
* ``free`` merges with both neighbours at once, so free space never stays split into
  adjacent pieces: after every object is freed the segment is one block again.

::

    granules  0 ........ off ........ off+n ........ end
              [ free ][  allocated n  ][    free     ]
                 ^ _free_by_end[off]     ^ _free_by_start[off+n]
"""

from __future__ import annotations

from kvcake.common.errors import InvalidParamsError

GRANULE = 64
_LINEAR = 8  # exact classes for blocks below this many granules
_SUB_BITS = 3  # 2**3 = 8 classes per power of two


def size_class(granules: int) -> int:
    """The bin holding a free block of ``granules`` (its size rounded down to a class)."""
    if granules < _LINEAR:
        return granules
    exponent = granules.bit_length() - 1
    mantissa = (granules >> (exponent - _SUB_BITS)) & (_LINEAR - 1)
    return _LINEAR + (exponent - _SUB_BITS) * _LINEAR + mantissa


def class_floor(index: int) -> int:
    """The smallest block size (granules) that lands in bin ``index``."""
    if index < _LINEAR:
        return index
    exponent, mantissa = divmod(index - _LINEAR, _LINEAR)
    return (_LINEAR + mantissa) << exponent


class SegmentAllocator:
    """Byte ranges of one segment of ``size`` bytes; offsets are multiples of 64."""

    def __init__(self, size: int) -> None:
        if size < GRANULE:
            raise InvalidParamsError(f"segment of {size} bytes is too small (min {GRANULE})")
        self.size = size
        self._total = size // GRANULE
        self._bins: list[dict[int, None]] = [{} for _ in range(size_class(self._total) + 1)]
        self._nonempty = 0  # bit i set <=> _bins[i] has a block
        self._free_by_start: dict[int, int] = {}  # start granule -> length
        self._free_by_end: dict[int, int] = {}  # end granule -> start
        self._allocated: dict[int, int] = {}  # start granule -> length
        self._used = 0
        self._insert_free(0, self._total)

    @classmethod
    def with_allocations(cls, size: int, allocations: list[tuple[int, int]]) -> SegmentAllocator:
        """An allocator whose blocks ``(offset, nbytes)`` are taken (a failover rebuild);
        overlapping or out-of-range blocks are refused."""
        allocator = cls(size)
        allocator._remove_free(0, allocator._total)
        position = 0
        for offset, nbytes in sorted(allocations):
            start, need = offset // GRANULE, _granules(nbytes)
            if offset % GRANULE or start < position or start + need > allocator._total:
                raise InvalidParamsError(f"allocation [{offset}, {offset + nbytes}) overlaps "
                                         f"another or lies outside the segment of {size} bytes")
            if start > position:
                allocator._insert_free(position, start - position)
            allocator._allocated[start] = need
            allocator._used += need
            position = start + need
        if position < allocator._total:
            allocator._insert_free(position, allocator._total - position)
        return allocator

    # ----- queries
    @property
    def capacity(self) -> int:
        """Usable bytes: the size rounded down to whole granules."""
        return self._total * GRANULE

    @property
    def used_bytes(self) -> int:
        return self._used * GRANULE

    @property
    def free_bytes(self) -> int:
        return (self._total - self._used) * GRANULE

    @property
    def num_allocations(self) -> int:
        return len(self._allocated)

    def largest_free(self) -> int:
        """Bytes of the largest free block (exact; scans the highest non-empty bin)."""
        if not self._nonempty:
            return 0
        top = self._bins[self._nonempty.bit_length() - 1]
        return max(self._free_by_start[start] for start in top) * GRANULE

    def can_allocate(self, nbytes: int) -> bool:
        return self._find(_granules(nbytes)) is not None

    def allocation_size(self, offset: int) -> int:
        """Bytes reserved at ``offset`` (a request's size rounded up to 64)."""
        return self._allocated[offset // GRANULE] * GRANULE

    # ----- changes
    def allocate(self, nbytes: int) -> int | None:
        """Reserve ``nbytes``; the byte offset, or ``None`` when no free block fits."""
        need = _granules(nbytes)
        start = self._find(need)
        if start is None:
            return None
        length = self._free_by_start[start]
        self._remove_free(start, length)
        if length > need:
            self._insert_free(start + need, length - need)
        self._allocated[start] = need
        self._used += need
        return start * GRANULE

    def split(self, offset: int, nbytes: int) -> int | None:
        """Cut the block at ``offset`` in two: its first ``nbytes`` (rounded up to 64) and
        the rest, each an allocation of its own; the rest's offset (``None``: nothing is
        left, the block is ``nbytes`` long)."""
        start, need = offset // GRANULE, _granules(nbytes)
        length = self._allocated.get(start, 0)
        if offset % GRANULE or need > length:
            raise InvalidParamsError(f"no allocation of at least {nbytes} bytes at {offset}")
        if need == length:
            return None
        self._allocated[start] = need
        self._allocated[start + need] = length - need
        return (start + need) * GRANULE

    def free(self, offset: int) -> None:
        """Give back the block that :meth:`allocate` returned at ``offset``."""
        start = offset // GRANULE
        length = self._allocated.pop(start, None)
        assert length is not None and offset % GRANULE == 0, f"no allocation at {offset}"
        self._used -= length
        before = self._free_by_end.get(start)
        if before is not None:  # merge with the free block that ends where this one starts
            self._remove_free(before, start - before)
            length += start - before
            start = before
        after = self._free_by_start.get(start + length)
        if after is not None:
            self._remove_free(start + length, after)
            length += after
        self._insert_free(start, length)

    # ----- internals
    def _find(self, need: int) -> int | None:
        if need > self._total:
            return None
        lowest = size_class(need)
        if class_floor(lowest) < need:
            lowest += 1  # blocks of the request's own class may be smaller than the request
        above = self._nonempty >> lowest
        if above:
            index = lowest + (above & -above).bit_length() - 1
            return next(iter(self._bins[index]))
        if lowest > 0 and class_floor(lowest - 1) < need:  # nearly full: try the own class
            for start in self._bins[lowest - 1]:
                if self._free_by_start[start] >= need:
                    return start
        return None

    def _insert_free(self, start: int, length: int) -> None:
        index = size_class(length)
        self._bins[index][start] = None
        self._nonempty |= 1 << index
        self._free_by_start[start] = length
        self._free_by_end[start + length] = start

    def _remove_free(self, start: int, length: int) -> None:
        index = size_class(length)
        bucket = self._bins[index]
        del bucket[start]
        if not bucket:
            self._nonempty &= ~(1 << index)
        del self._free_by_start[start]
        del self._free_by_end[start + length]

    def check_integrity(self) -> None:
        """Assert that free and allocated blocks tile the segment and bins are consistent."""
        blocks = sorted([(s, n, False) for s, n in self._free_by_start.items()]
                        + [(s, n, True) for s, n in self._allocated.items()])
        position, previous_free = 0, False
        for start, length, allocated in blocks:
            assert start == position, f"gap or overlap at granule {position}"
            assert allocated or not previous_free, f"unmerged free blocks at {start}"
            assert allocated or start in self._bins[size_class(length)], f"bin miss at {start}"
            position, previous_free = start + length, not allocated
        assert position == self._total, "blocks do not cover the segment"
        assert self._used == sum(self._allocated.values())
        for index, bucket in enumerate(self._bins):
            assert bool(bucket) == bool(self._nonempty >> index & 1), f"bitmap wrong at {index}"


def _granules(nbytes: int) -> int:
    if nbytes <= 0:
        raise InvalidParamsError(f"allocation size must be > 0, got {nbytes}")
    return -(-nbytes // GRANULE)
