"""The global KV pool alone: replay a trace's prefix blocks through a bounded cache.

Per row, in file order (the rules of the traces README)::

    matched = leading hash ids of the row already in the pool (stop at the first miss)
    then every id of the row is inserted or touched, in order (most recently used last),
    and while the pool holds more than ``capacity`` blocks the policy's first key goes

hit ratio (blocks) = matched blocks / all block references
hit ratio (tokens) = sum(min(block_tokens * matched, input_length)) / sum(input_length)

The order comes from the store's own eviction registry (``store.eviction``), so ``lru`` here
is the code the master evicts with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvcake.common.errors import InvalidParamsError
from kvcake.common.trace import TRACE_BLOCK_TOKENS, TraceRecord
from kvcake.store import EvictionPolicy, make_eviction_policy


@dataclass(frozen=True)
class CacheReplay:
    """What a replay saw; ``capacity`` 0 means unbounded."""

    capacity: int
    eviction: str
    num_requests: int
    num_blocks: int
    num_hit_blocks: int
    num_tokens: int
    num_hit_tokens: int
    num_evictions: int

    @property
    def hit_ratio_blocks(self) -> float:
        return self.num_hit_blocks / self.num_blocks if self.num_blocks else 0.0

    @property
    def hit_ratio_tokens(self) -> float:
        return self.num_hit_tokens / self.num_tokens if self.num_tokens else 0.0


class PoolCache:
    """A cache of ``capacity`` blocks (0: unbounded) named by keys: trace hash ids for the
    global pool alone, block keys for a simulated instance or store tier."""

    def __init__(self, capacity: int, eviction: str = "lru") -> None:
        if capacity < 0:
            raise InvalidParamsError(f"capacity must be >= 0 blocks, got {capacity}")
        self.capacity = capacity
        self.policy: EvictionPolicy = make_eviction_policy(eviction)
        self.num_evictions = 0

    def matched(self, keys: Iterable[int | str]) -> int:
        """Leading keys present in the cache."""
        count = 0
        for key in keys:
            if str(key) not in self.policy:
                break
            count += 1
        return count

    def admit(self, keys: Iterable[int | str]) -> list[str]:
        """Insert or touch each key in order, evicting past the capacity; the evicted keys."""
        evicted: list[str] = []
        for key in map(str, keys):
            if key in self.policy:
                self.policy.touch(key)
                continue
            self.policy.insert(key)
            if self.capacity and len(self.policy) > self.capacity:
                victim = next(iter(self.policy))
                self.policy.discard(victim)
                evicted.append(victim)
        self.num_evictions += len(evicted)
        return evicted

    def __len__(self) -> int:
        return len(self.policy)


def replay_pool(records: Iterable[TraceRecord], capacity: int, eviction: str = "lru",
                block_tokens: int = TRACE_BLOCK_TOKENS) -> CacheReplay:
    """Every row through one :class:`PoolCache`, in order."""
    pool = PoolCache(capacity, eviction)
    rows = blocks = hit_blocks = tokens = hit_tokens = 0
    for record in records:
        matched = pool.matched(record.hash_ids)
        pool.admit(record.hash_ids)
        rows += 1
        blocks += len(record.hash_ids)
        hit_blocks += matched
        tokens += record.input_length
        hit_tokens += min(block_tokens * matched, record.input_length)
    return CacheReplay(capacity, eviction, rows, blocks, hit_blocks, tokens, hit_tokens,
                       pool.num_evictions)
