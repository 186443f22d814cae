"""SegmentAllocator: exact offsets for scripted sequences, and long churn without collapse."""

from __future__ import annotations

import math
import random
from collections import OrderedDict

import pytest

from kvcake.common.errors import InvalidParamsError
from kvcake.store.master.allocator import GRANULE, SegmentAllocator

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30


def make_allocator(granules: int = 64) -> SegmentAllocator:
    allocator = SegmentAllocator(granules * GRANULE)
    allocator.check_integrity()
    return allocator


def allocate(allocator: SegmentAllocator, nbytes: int) -> int | None:
    offset = allocator.allocate(nbytes)
    allocator.check_integrity()
    return offset


def free(allocator: SegmentAllocator, offset: int) -> None:
    allocator.free(offset)
    allocator.check_integrity()


def test_allocations_are_packed_and_rounded_to_granules() -> None:
    allocator = make_allocator(64)
    assert [allocate(allocator, n) for n in (100, 64, 1, 200)] == [0, 128, 192, 256]
    assert [allocator.allocation_size(o) for o in (0, 128, 192, 256)] == [128, 64, 64, 256]
    assert (allocator.used_bytes, allocator.free_bytes) == (512, 4096 - 512)
    assert allocator.num_allocations == 4
    assert allocator.largest_free() == 4096 - 512


def test_freed_neighbours_coalesce_and_an_exact_hole_is_reused() -> None:
    allocator = make_allocator(64)
    for nbytes in (128, 64, 64, 256):
        allocate(allocator, nbytes)  # granules [0,2) [2,3) [3,4) [4,8); free [8,64)
    free(allocator, 128)
    free(allocator, 192)  # merges with [2,3) into the hole [2,4)
    assert allocator.largest_free() == 56 * GRANULE
    assert allocate(allocator, 2 * GRANULE) == 128  # the hole's own class: an exact fit
    assert allocate(allocator, GRANULE) == 512  # nothing left below the tail
    free(allocator, 0)
    free(allocator, 256)
    free(allocator, 128)  # joins [0,2) and [4,8): one block [0,8) before [8,9)
    assert allocator.largest_free() == 55 * GRANULE
    free(allocator, 512)
    assert (allocator.largest_free(), allocator.num_allocations, allocator.used_bytes) == (
        4096, 0, 0)


def test_a_hole_smaller_than_its_class_is_used_only_when_nothing_larger_is_free() -> None:
    allocator = make_allocator(64)
    assert allocate(allocator, 17 * GRANULE) == 0
    assert allocate(allocator, GRANULE) == 17 * GRANULE
    free(allocator, 0)  # a 17-granule hole in the class of 16..17-granule blocks
    assert allocate(allocator, 17 * GRANULE) == 18 * GRANULE  # any block of a higher class fits
    assert allocate(allocator, 29 * GRANULE) == 35 * GRANULE  # the 29-granule tail, exactly
    assert allocate(allocator, 17 * GRANULE) == 0  # nothing above: the own class is scanned
    assert (allocator.free_bytes, allocator.largest_free()) == (0, 0)


def test_none_when_full_or_too_large_and_state_unchanged() -> None:
    allocator = make_allocator(64)
    assert allocate(allocator, 4096 + 1) is None
    assert allocate(allocator, 4000) == 0  # 63 granules
    assert not allocator.can_allocate(2 * GRANULE)
    assert allocate(allocator, 2 * GRANULE) is None
    assert allocator.can_allocate(GRANULE)
    assert allocate(allocator, GRANULE) == 63 * GRANULE
    assert allocate(allocator, 1) is None
    assert (allocator.used_bytes, allocator.num_allocations) == (4096, 2)


@pytest.mark.parametrize("nbytes", [0, -1, -GRANULE])
def test_invalid_sizes_raise(nbytes: int) -> None:
    allocator = make_allocator(64)
    with pytest.raises(InvalidParamsError, match="must be > 0"):
        allocator.allocate(nbytes)
    with pytest.raises(InvalidParamsError):
        allocator.can_allocate(nbytes)
    assert allocator.used_bytes == 0
    allocator.check_integrity()


@pytest.mark.parametrize("size", [0, 1, GRANULE - 1])
def test_segment_smaller_than_a_granule_is_refused(size: int) -> None:
    with pytest.raises(InvalidParamsError, match="too small"):
        SegmentAllocator(size)


def test_a_size_that_is_not_a_multiple_of_64_loses_only_the_tail() -> None:
    allocator = SegmentAllocator(4096 + 63)
    assert (allocator.free_bytes, allocator.largest_free()) == (4096, 4096)
    assert allocate(allocator, 4096) == 0
    assert allocate(allocator, 1) is None


# ----- churn

CHURN_CYCLES = 2_000_000
CHURN_SIZE = GIB
WARM_UP_CYCLES = CHURN_CYCLES // 4  # an empty allocator fills up nearly perfectly at first


def test_churn_does_not_collapse_into_fragments() -> None:
    """Puts of log-uniform sizes (4 KiB..16 MiB) on 1 GiB; when one does not fit, the least
    recently stored object goes (LRU) until it does. Utilisation when the allocator first
    refuses a put measures fragmentation: it must stay high and must not drift down."""
    rng = random.Random(20240607)
    allocator = SegmentAllocator(CHURN_SIZE)
    low, high = math.log(4 * KIB), math.log(16 * MIB)
    live: OrderedDict[int, int] = OrderedDict()  # put number -> offset, oldest first
    used_at_failure: list[int] = []
    for cycle in range(CHURN_CYCLES):
        nbytes = int(math.exp(rng.uniform(low, high)))
        offset = allocator.allocate(nbytes)
        if offset is None:
            if cycle >= WARM_UP_CYCLES:
                used_at_failure.append(allocator.used_bytes)
            while offset is None:
                allocator.free(live.popitem(last=False)[1])
                offset = allocator.allocate(nbytes)
        live[cycle] = offset
        if cycle % 250_000 == 0:
            allocator.check_integrity()

    tenth = len(used_at_failure) // 10
    assert tenth >= 1000, f"only {len(used_at_failure)} failures: the test is not churning"
    first = sum(used_at_failure[:tenth]) / tenth / CHURN_SIZE
    last = sum(used_at_failure[-tenth:]) / tenth / CHURN_SIZE
    assert last >= 0.85, f"utilisation at failure fell to {last:.3f} (first {first:.3f})"
    assert last >= first - 0.05, f"utilisation at failure drifted {first:.3f} -> {last:.3f}"

    allocator.check_integrity()
    for offset in live.values():
        allocator.free(offset)
    assert allocator.largest_free() == CHURN_SIZE // GRANULE * GRANULE
    assert (allocator.used_bytes, allocator.num_allocations) == (0, 0)
    allocator.check_integrity()
