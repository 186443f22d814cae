"""``get_into_ranges``: which byte ranges of which values go where, and the nested answer,
with Mooncake's shapes and codes. Pure (the caller does the reads).

Buffer-major: for buffer ``i``, key ``j`` of ``all_keys[i]``, range ``k``: copy
``all_sizes[i][j][k]`` bytes of the value from ``all_src_offsets[i][j][k]`` to the buffer at
``all_dst_offsets[i][j][k]``. The answer has the same nesting: bytes read, or a code::

    results[i][j][k]   one per range of all_dst_offsets[i][j] (one when that list is missing)
    INVALID_PARAMS     the lists' lengths disagree (whole call, buffer, or key), the buffer
                       is not registered, or the range runs past the buffer or the value
    key's code         the key cannot be read (e.g. OBJECT_NOT_FOUND): every range of it
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from kvcake.common.errors import ErrorCode

Nested = Sequence[Sequence[Sequence[int]]]
Results = list[list[list[int]]]


@dataclass(frozen=True)
class RangeRead:
    """Range ``(i, j, k)``: ``size`` bytes of ``key`` from ``src`` into buffer ``i`` at
    ``dst``."""

    i: int
    j: int
    k: int
    key: str
    dst: int
    src: int
    size: int


@dataclass(frozen=True)
class Plan:
    """The ranges to read, and the keys of every well-formed row (whose codes the caller
    looks up: a key that cannot be read fails its whole row)."""

    reads: list[RangeRead]
    rows: list[tuple[int, int, str]]  # (i, j, key)


def skeleton(num_buffers: int, all_keys: Sequence[Sequence[str]],
             all_dst_offsets: Nested) -> Results:
    """The answer's shape, every range ``INVALID_PARAMS``."""
    bad = int(ErrorCode.INVALID_PARAMS)
    results: Results = []
    for i in range(num_buffers):
        rows = len(all_keys[i]) if i < len(all_keys) else 1
        results.append([[bad] * _ranges_of(all_dst_offsets, i, j) for j in range(rows)])
    return results


def _ranges_of(all_dst_offsets: Nested, i: int, j: int) -> int:
    if i < len(all_dst_offsets) and j < len(all_dst_offsets[i]):
        return len(all_dst_offsets[i][j])
    return 1


def plan(buffer_ptrs: Sequence[int], all_keys: Sequence[Sequence[str]],
         all_dst_offsets: Nested, all_src_offsets: Nested, all_sizes: Nested,
         capacity: Callable[[int], int]) -> Plan:
    """What to read; ranges left out keep ``INVALID_PARAMS``. ``capacity(address)``:
    registered bytes from ``address`` on (0: not registered)."""
    count = len(buffer_ptrs)
    if any(len(x) != count for x in (all_keys, all_dst_offsets, all_src_offsets, all_sizes)):
        return Plan([], [])
    reads: list[RangeRead] = []
    rows: list[tuple[int, int, str]] = []
    for i, address in enumerate(buffer_ptrs):
        room = capacity(address) if address > 0 else 0
        keys, dsts, srcs, sizes = (all_keys[i], all_dst_offsets[i], all_src_offsets[i],
                                   all_sizes[i])
        if not room or not len(keys) == len(dsts) == len(srcs) == len(sizes):
            continue
        for j, key in enumerate(keys):
            if not len(dsts[j]) == len(srcs[j]) == len(sizes[j]):
                continue
            rows.append((i, j, key))
            reads += [RangeRead(i, j, k, key, dst, src, size)
                      for k, (dst, src, size) in enumerate(zip(dsts[j], srcs[j], sizes[j],
                                                               strict=True))
                      if dst >= 0 and 0 <= size <= room - dst]
    return Plan(reads, rows)


def fill(results: Results, plan: Plan, outcomes: Sequence[int],
         key_codes: Mapping[str, int]) -> Results:
    """Put each read's outcome in place, then fail every row whose key cannot be read
    (``key_codes``: 0, or the key's code)."""
    for read, outcome in zip(plan.reads, outcomes, strict=True):
        results[read.i][read.j][read.k] = outcome
    for i, j, key in plan.rows:
        if key_codes.get(key, 0) < 0:
            results[i][j] = [key_codes[key]] * len(results[i][j])
    return results
