"""BlockPool: exact block ids and eviction order for scripted scenarios, then random churn."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcake.common.errors import InvalidParamsError
from kvcake.engine.kv.block_pool import BlockPool


def h(n: int) -> bytes:
    """A stand-in 32-byte prefix digest."""
    return n.to_bytes(32, "big")


class Checked:
    """A BlockPool whose integrity is checked after every mutating call."""

    def __init__(self, num_blocks: int) -> None:
        self.evicted: list[bytes] = []
        self.pool = BlockPool(num_blocks, on_evict=self.evicted.append)
        self.pool.check_integrity()

    def allocate(self, n: int) -> list[int]:
        ids = self.pool.allocate(n)
        self.pool.check_integrity()
        return ids

    def free(self, ids: list[int]) -> None:
        self.pool.free(ids)
        self.pool.check_integrity()

    def touch(self, ids: list[int]) -> None:
        self.pool.touch(ids)
        self.pool.check_integrity()

    def cache(self, block_id: int, n: int) -> bool:
        ok = self.pool.cache_block(block_id, h(n))
        self.pool.check_integrity()
        return ok


@pytest.fixture
def pool() -> Checked:
    return Checked(8)


def test_rejects_empty_pool() -> None:
    with pytest.raises(InvalidParamsError, match="num_blocks"):
        BlockPool(0)


def test_allocate_in_id_order_and_free_to_tail(pool: Checked) -> None:
    assert pool.pool.free_block_ids() == list(range(8))
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.pool.num_free_blocks == 3
    pool.free([1, 0])
    assert pool.pool.free_block_ids() == [5, 6, 7, 1, 0]
    assert pool.allocate(4) == [5, 6, 7, 1]
    assert pool.pool.can_allocate(1) and not pool.pool.can_allocate(2)
    assert pool.allocate(1) == [0]
    assert pool.pool.num_free_blocks == 0
    assert pool.allocate(0) == []


def test_allocate_past_free_is_a_bug(pool: Checked) -> None:
    pool.allocate(8)
    with pytest.raises(AssertionError):
        pool.pool.allocate(1)


def test_double_free_is_a_bug(pool: Checked) -> None:
    [block] = pool.allocate(1)
    pool.free([block])
    with pytest.raises(AssertionError):
        pool.pool.free([block])


def test_freed_cached_blocks_are_reused_least_recently_freed_first(pool: Checked) -> None:
    a = pool.allocate(2)
    b = pool.allocate(2)
    for block_id, n in zip(a + b, (10, 11, 20, 21), strict=True):
        assert pool.cache(block_id, n)
    pool.free(b[::-1])  # request b finishes first: 3, 2
    pool.free(a[::-1])  # then a: 1, 0
    assert pool.pool.free_block_ids() == [4, 5, 6, 7, 3, 2, 1, 0]
    assert pool.allocate(4) == [4, 5, 6, 7]  # never-used blocks go first: no eviction
    assert pool.evicted == []
    assert pool.allocate(3) == [3, 2, 1]
    assert pool.evicted == [h(21), h(20), h(11)]
    assert pool.pool.lookup(h(10)) == 0
    assert pool.pool.lookup(h(11)) is None
    assert pool.pool.stats().num_evictions == 3


def test_prefix_hit_revives_a_free_cached_block(pool: Checked) -> None:
    first = pool.allocate(3)
    for block_id, n in zip(first, (1, 2, 3), strict=True):
        pool.cache(block_id, n)
    pool.free(first[::-1])
    assert pool.pool.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]
    hit = pool.pool.match_prefix([h(1), h(2), h(9), h(3)])
    assert hit == [0, 1]  # stops at the first miss even though h(3) is cached
    assert pool.pool.ref_count(0) == 0  # match_prefix alone changes nothing
    pool.touch(hit)
    assert [pool.pool.ref_count(b) for b in (0, 1, 2)] == [1, 1, 0]
    assert pool.pool.free_block_ids() == [3, 4, 5, 6, 7, 2]
    stats = pool.pool.stats()
    assert (stats.num_queried_blocks, stats.num_hit_blocks, stats.hit_rate) == (4, 2, 0.5)


def test_touch_shares_an_owned_block(pool: Checked) -> None:
    [block] = pool.allocate(1)
    pool.cache(block, 7)
    pool.touch([block])
    pool.free([block])
    assert pool.pool.ref_count(block) == 1
    assert block not in pool.pool.free_block_ids()
    pool.free([block])
    assert pool.pool.free_block_ids()[-1] == block


def test_touch_of_a_free_uncached_block_is_a_bug(pool: Checked) -> None:
    with pytest.raises(AssertionError):
        pool.pool.touch([0])


def test_eviction_drops_the_hash() -> None:
    small = Checked(2)
    [a, b] = small.allocate(2)
    small.cache(a, 1)
    small.cache(b, 2)
    small.free([b, a])
    assert small.allocate(1) == [b]
    assert small.pool.lookup(h(2)) is None
    assert small.pool.block_hash(b) is None
    assert small.pool.match_prefix([h(1), h(2)]) == [a]
    assert small.evicted == [h(2)]
    assert small.pool.num_cached_blocks == 1


def test_duplicate_content_keeps_the_existing_block(pool: Checked) -> None:
    a, b = pool.allocate(2)
    assert pool.cache(a, 5)
    assert not pool.cache(b, 5)
    assert pool.pool.lookup(h(5)) == a
    assert pool.pool.block_hash(b) is None
    assert pool.cache(a, 5)  # same hash again: a no-op
    with pytest.raises(AssertionError):
        pool.pool.cache_block(a, h(6))


def test_reverse_free_evicts_a_request_tail_first(pool: Checked) -> None:
    pool.allocate(4)  # 0..3 stay owned so the queue holds only the request's blocks
    request = pool.allocate(4)
    assert request == [4, 5, 6, 7]
    for block_id, n in zip(request, (1, 2, 3, 4), strict=True):
        pool.cache(block_id, n)
    pool.free(request[::-1])
    assert pool.allocate(2) == [7, 6]
    assert pool.evicted == [h(4), h(3)]
    assert pool.pool.match_prefix([h(1), h(2), h(3), h(4)]) == [4, 5]  # the prefix survives


def test_reset_prefix_cache_only_when_all_free(pool: Checked) -> None:
    a, b = pool.allocate(2)
    pool.cache(a, 1)
    pool.cache(b, 2)
    pool.free([b])
    assert not pool.pool.reset_prefix_cache()
    assert pool.pool.num_cached_blocks == 2
    pool.free([a])
    assert pool.pool.reset_prefix_cache()
    pool.pool.check_integrity()
    assert pool.pool.num_cached_blocks == 0
    assert pool.pool.match_prefix([h(1)]) == []
    assert sorted(pool.evicted) == [h(1), h(2)]
    assert pool.pool.stats().num_evictions == 0  # a reset is not pressure
    assert pool.pool.free_block_ids() == [2, 3, 4, 5, 6, 7, 1, 0]


def test_check_integrity_names_a_broken_invariant(pool: Checked) -> None:
    pool.pool._ref_counts[3] = 1  # corrupt on purpose: owned yet still queued
    with pytest.raises(AssertionError, match="block 3"):
        pool.pool.check_integrity()


class Model:
    """The pool's specification as plain lists, compared step by step with the real one."""

    def __init__(self, num_blocks: int) -> None:
        self.refs = [0] * num_blocks
        self.hashes: dict[int, bytes] = {}
        self.queue = list(range(num_blocks))

    def allocate(self, n: int) -> list[int]:
        taken, self.queue = self.queue[:n], self.queue[n:]
        for block_id in taken:
            self.hashes.pop(block_id, None)
            self.refs[block_id] = 1
        return taken

    def touch(self, block_id: int) -> None:
        if self.refs[block_id] == 0:
            self.queue.remove(block_id)
        self.refs[block_id] += 1

    def free(self, block_id: int) -> None:
        self.refs[block_id] -= 1
        if self.refs[block_id] == 0:
            self.queue.append(block_id)


operations = st.lists(st.tuples(st.sampled_from("aftcm"), st.integers(0, 15)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_random_operations_match_the_model(ops: list[tuple[str, int]]) -> None:
    num_blocks = 6
    pool, model = BlockPool(num_blocks), Model(num_blocks)
    for op, arg in ops:
        owned = [b for b in range(num_blocks) if model.refs[b] > 0]
        if op == "a" and pool.can_allocate(arg % 4):
            assert pool.allocate(arg % 4) == model.allocate(arg % 4)
        elif op == "f" and owned:
            block_id = owned[arg % len(owned)]
            pool.free([block_id])
            model.free(block_id)
        elif op == "c" and owned:
            block_id, digest = owned[arg % len(owned)], h(arg % 5)
            if model.hashes.get(block_id, digest) == digest:
                holder = next((b for b, d in model.hashes.items() if d == digest), block_id)
                assert pool.cache_block(block_id, digest) == (holder == block_id)
                model.hashes[holder] = digest
        elif op in "tm":
            hit = pool.match_prefix([h(arg % 5)])
            if op == "t" and hit:
                pool.touch(hit)
                model.touch(hit[0])
        pool.check_integrity()
        assert pool.free_block_ids() == model.queue
        assert [pool.block_hash(b) for b in range(num_blocks)] == [
            model.hashes.get(b) for b in range(num_blocks)]
