"""Per-request block tables on top of the shared :class:`BlockPool` (which only this
manager touches: callers outside ``engine/kv`` use its methods).

A request's blocks, left to right (``B`` tokens each)::

    | hit (local cache) | hit (loaded from store) | computed | allocated for this chunk |
    |<------------------ num_computed_tokens ------------------>|

Full blocks are registered in the pool's prefix map as soon as their K/V exist, so a
concurrent request with the same prefix reuses them at once.

At least one token is always computed (its logits give the first output token). When the
whole prompt is cached and the manager can copy blocks, only that last token is: the last
block is copied into a block of the request's own (shared blocks are never written) and the
token's K/V are recomputed there::

    prompt of 3 full blocks, all cached:   | shared | shared | copy of the 3rd |
                                           computed: 3B - 1 tokens; this step: 1 token

Without ``copy_block`` the whole last block is recomputed, as vLLM does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from kvcake.engine.kv.block_pool import BlockPool
from kvcake.engine.request import Request


class KVCacheManager:
    """Allocates, shares and frees the blocks of requests."""

    def __init__(self, num_blocks: int, block_size: int,
                 on_cache: Callable[[bytes], None] | None = None,
                 on_evict: Callable[[bytes], None] | None = None,
                 copy_block: Callable[[int, int], None] | None = None) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, on_evict, on_cache)
        self.copy_block = copy_block  # (source, destination): K/V of every layer
        self._num_registered: dict[str, int] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return self.pool.can_allocate(num_blocks)

    def cached_hashes(self) -> list[bytes]:
        """Every prefix digest the cache holds (a snapshot for the conductor)."""
        return self.pool.cached_hashes()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; refused (False) while any block has an owner."""
        return self.pool.reset_prefix_cache()

    def max_hit_blocks(self, request: Request) -> int:
        """Blocks a prefix hit may cover: every full one when the last token alone can be
        recomputed (see the module's docstring), else those before the last token's block;
        none when the prompt's tokens are to be scored (cached tokens have no logits)."""
        if request.params.prompt_logprobs is not None:
            return 0
        last = request.num_tokens - (self.copy_block is None)
        return min(len(request.block_hashes), last // self.block_size)

    def hit_tokens(self, request: Request, num_blocks: int) -> int:
        """Tokens ``num_blocks`` hit blocks spare from computing (never the last token)."""
        return min(num_blocks * self.block_size, request.num_tokens - 1)

    def take_local_hit(self, request: Request) -> int:
        """Attach the leading cached blocks to ``request``; returns how many."""
        hashes = request.block_hashes[:self.max_hit_blocks(request)]
        hit = self.pool.match_prefix(hashes)
        self.pool.touch(hit)
        if hit and len(hit) * self.block_size >= request.num_tokens:  # the last token too
            hit = self._copy_last(hit)
        request.block_ids = hit
        computed = self.hit_tokens(request, len(hit))
        request.num_computed_tokens = request.num_cached_tokens = computed
        self._num_registered[request.request_id] = computed // self.block_size
        return len(hit)

    def _copy_last(self, hit: list[int]) -> list[int]:
        """``hit`` with its last block replaced by a private copy (its last token is to be
        recomputed there); without a free block, ``hit`` less its last block (whose tokens
        are then recomputed, as without copies)."""
        assert self.copy_block is not None
        shared, last = hit[:-1], hit[-1]
        if not self.pool.can_allocate(1):
            self.pool.free([last])
            return shared
        (own,) = self.pool.allocate(1)
        self.copy_block(last, own)
        self.pool.free([last])
        return [*shared, own]

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        end = request.num_computed_tokens + num_new_tokens
        return max(0, -(-end // self.block_size) - len(request.block_ids))

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for ``num_new_tokens`` more tokens; ``False`` (nothing changed) if full."""
        need = self.blocks_needed(request, num_new_tokens)
        if not self.pool.can_allocate(need):
            return False
        request.block_ids.extend(self.pool.allocate(need))
        return True

    def allocate_blocks(self, request: Request, count: int) -> list[int] | None:
        """``count`` more blocks at the end of the request's table (for store loads)."""
        if not self.pool.can_allocate(count):
            return None
        new = self.pool.allocate(count)
        request.block_ids.extend(new)
        return new

    def register_full_blocks(self, request: Request) -> None:
        """Publish blocks whose K/V are now complete in the prefix map."""
        done = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        first = self._num_registered.get(request.request_id, 0)
        for i in range(first, done):
            self.pool.cache_block(request.block_ids[i], request.block_hashes[i])
        self._num_registered[request.request_id] = max(first, done)

    def reserve(self, count: int, hashes: Sequence[bytes] = ()) -> tuple[list[int], int] | None:
        """``count`` blocks owned by no request yet, for a prompt a peer computes: the leading
        ones this cache holds under ``hashes`` (shared, as a prefix hit is) and fresh ones for
        the rest, which the peer writes. Returns the blocks and how many lead cached; ``None``
        (nothing held) when the pool cannot give the rest."""
        hit = self.pool.match_prefix(hashes[:count])
        self.pool.touch(hit)
        if not self.pool.can_allocate(count - len(hit)):
            self.pool.free(reversed(hit))
            return None
        return hit + self.pool.allocate(count - len(hit)), len(hit)

    def release(self, block_ids: Iterable[int]) -> None:
        """Give back reserved blocks (in the order given, see :meth:`BlockPool.free`)."""
        self.pool.free(block_ids)

    def adopt(self, request: Request, block_ids: list[int]) -> None:
        """Give ``request`` blocks that already hold its prompt's K/V (written by a peer)."""
        request.block_ids = block_ids
        self._num_registered[request.request_id] = 0
        self.register_full_blocks(request)

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first so its prefix stays cached longest."""
        self.pool.free(list(reversed(request.block_ids)))
        request.block_ids = []
        self._num_registered.pop(request.request_id, None)

    def check_integrity(self, held: Iterable[Sequence[int]]) -> None:
        """The pool's invariants, and every block owned by exactly the tables in ``held``."""
        self.pool.check_integrity()
        owners = Counter(block_id for block_ids in held for block_id in block_ids)
        for block_id in range(self.pool.num_blocks):
            assert self.pool.ref_count(block_id) == owners[block_id], (
                f"block {block_id} has ref count {self.pool.ref_count(block_id)} but "
                f"{owners[block_id]} owners")
