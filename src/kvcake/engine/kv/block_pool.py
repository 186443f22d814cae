"""The paged KV cache's blocks: reference counts, an LRU free queue and a prefix-hash index.

Every block of the KV cache is in exactly one of two states::

    ref_count > 0   owned by one or more running requests   (not in the free queue)
    ref_count == 0  free, waiting in the free queue          (may still hold cached KV)

A full block may carry the chained prefix digest of its tokens (``common.hashing``); the
``_cached`` map goes from that digest to the block. Freeing a block does not forget its hash:
a free block with a hash is both reusable by a new request *and* a prefix-cache hit for
a request that shares the prefix. The hash is dropped only when ``allocate`` hands the block
out for new content (an eviction).

The free queue is ordered by eviction priority, least recently freed first::

    head (evicted next) -> [b3][b7][b1] ... [b5] <- tail (freed last, evicted last)

``allocate`` pops from the head; ``free`` appends to the tail; ``touch`` (a prefix hit on a
free block) takes the block out of the middle. An ``OrderedDict`` gives all three in O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kvcake.common.errors import InvalidParamsError


@dataclass(frozen=True)
class BlockPoolStats:
    """Counters since construction; ``hit_rate`` is hit blocks over queried blocks."""

    num_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    num_queried_blocks: int
    num_hit_blocks: int
    num_evictions: int

    @property
    def hit_rate(self) -> float:
        return self.num_hit_blocks / self.num_queried_blocks if self.num_queried_blocks else 0.0


class BlockPool:
    """Blocks ``0 .. num_blocks-1`` of one KV cache, with automatic prefix caching.

    ``on_evict(block_hash)`` is called whenever a hash leaves the index: when ``allocate``
    reuses a cached free block, and for every hash dropped by ``reset_prefix_cache``;
    ``on_cache(block_hash)`` whenever one joins it. Callers use them to tell the outside world
    (the conductor's prefix index) which prefixes this cache holds.
    """

    def __init__(self, num_blocks: int,
                 on_evict: Callable[[bytes], None] | None = None,
                 on_cache: Callable[[bytes], None] | None = None) -> None:
        if num_blocks < 1:
            raise InvalidParamsError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.on_evict = on_evict
        self.on_cache = on_cache
        self._ref_counts = [0] * num_blocks
        self._hashes: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._num_queried = 0
        self._num_hits = 0
        self._num_evictions = 0

    # ----- queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks with no owner, cached or not: what ``allocate`` can hand out."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def can_allocate(self, num_blocks: int) -> bool:
        return 0 <= num_blocks <= len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> bytes | None:
        return self._hashes[block_id]

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (the head, evicted next, first)."""
        return list(self._free)

    def cached_hashes(self) -> list[bytes]:
        """Every prefix digest the index holds (a snapshot for the conductor)."""
        return list(self._cached)

    def lookup(self, block_hash: bytes) -> int | None:
        """The block caching ``block_hash``, if any; changes nothing."""
        return self._cached.get(block_hash)

    def match_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """Blocks of the longest cached leading run of ``hashes`` (stops at the first miss).

        Only the hit/query counters change; call ``touch`` on the result to keep the blocks.
        """
        matched: list[int] = []
        for block_hash in hashes:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            matched.append(block_id)
        self._num_queried += len(hashes)
        self._num_hits += len(matched)
        return matched

    def stats(self) -> BlockPoolStats:
        return BlockPoolStats(self.num_blocks, len(self._free), len(self._cached),
                              self._num_queried, self._num_hits, self._num_evictions)

    # ----- ownership
    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` from the head of the free queue, each with ref count 1.

        A taken block that still caches a prefix is evicted from the index. The caller checks
        ``can_allocate`` first; asking for more than is free is a bug.
        """
        assert self.can_allocate(num_blocks), (
            f"allocate({num_blocks}) with {len(self._free)} free blocks")
        taken = [self._free.popitem(last=False)[0] for _ in range(num_blocks)]
        for block_id in taken:
            self._evict(block_id)
            self._ref_counts[block_id] = 1
        return taken

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add an owner to each block; a free block (a prefix hit) leaves the free queue."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                assert self._hashes[block_id] is not None, (
                    f"touch of free block {block_id} that caches nothing")
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one owner from each block; blocks reaching 0 join the free queue's tail.

        Blocks join in the order given, so the first one given is evicted first. Pass a
        request's blocks *in reverse* (last block first): its tail blocks, which only a
        request sharing the whole prefix could reuse, are then evicted before its head blocks.
        """
        for block_id in block_ids:
            assert self._ref_counts[block_id] > 0, f"free of free block {block_id}"
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None

    # ----- prefix index
    def cache_block(self, block_id: int, block_hash: bytes) -> bool:
        """Index a full, owned block under its prefix digest.

        Returns False (and indexes nothing) when another block already caches the same
        digest: the content is a duplicate, and the older block stays the one hits find.
        Re-caching a block under the hash it already has is a no-op returning True.
        """
        assert self._ref_counts[block_id] > 0, f"cache_block of free block {block_id}"
        current = self._hashes[block_id]
        if current is not None:
            assert current == block_hash, f"block {block_id} already caches another hash"
            return True
        if block_hash in self._cached:
            return False
        self._hashes[block_id] = block_hash
        self._cached[block_hash] = block_id
        if self.on_cache is not None:
            self.on_cache(block_hash)
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block has an owner."""
        if len(self._free) != self.num_blocks:
            return False
        dropped = list(self._cached)
        self._cached.clear()
        self._hashes = [None] * self.num_blocks
        if self.on_evict is not None:
            for block_hash in dropped:
                self.on_evict(block_hash)
        return True

    def _evict(self, block_id: int) -> None:
        block_hash = self._hashes[block_id]
        if block_hash is None:
            return
        self._hashes[block_id] = None
        del self._cached[block_hash]
        self._num_evictions += 1
        if self.on_evict is not None:
            self.on_evict(block_hash)

    # ----- invariants
    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant."""
        for block_id, ref_count in enumerate(self._ref_counts):
            assert ref_count >= 0, f"block {block_id} has ref count {ref_count}"
            in_queue = block_id in self._free
            assert in_queue == (ref_count == 0), (
                f"block {block_id} with ref count {ref_count} "
                f"{'is' if in_queue else 'is not'} in the free queue")
        assert all(0 <= b < self.num_blocks for b in self._free), "free queue has a bad id"
        assert len(self._free) == self._ref_counts.count(0), "free queue length is off"
        for block_hash, block_id in self._cached.items():
            assert self._hashes[block_id] == block_hash, (
                f"index maps a hash to block {block_id}, which holds another")
        num_hashed = sum(h is not None for h in self._hashes)
        assert num_hashed == len(self._cached), (
            f"{num_hashed} blocks hold hashes but the index has {len(self._cached)}")
