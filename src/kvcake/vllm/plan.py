"""The scheduler side of kvcake's vLLM connector, without vLLM: which blocks of each request
come from the store before a step, and which go to it after. No I/O, no torch.

A prompt's blocks, each with its hash (see ``vllm.connector``)::

    block      0        1        2        3         4: partial, a key of its own kind
    tokens   [0,128) [128,256) [256,384) [384,512) [512,530)
             |<- local cache ->|<- store hit -------------------->| computed: token 529
                                                                    only, whose logits
                                                                    start the output

vLLM's own prefix cache reuses whole blocks short of the last token, so it computes up to a
block's worth of tokens again (all of block 4 above; all of block 3 for a 512-token prompt).
The store also holds the last block of each prompt longer than a block, partial or not: a
hit loads every token but the last (:func:`loadable_blocks`), and one token is computed.

A later prompt that extends an earlier one (a conversation's next turn) holds the earlier
prompt's tail at the start of a block whose key is new. Where the chain of full blocks stops,
the store is asked for a partial record there under every count of this prompt's tokens that
fits (:func:`tail_candidates`), and the longest found is loaded::

    earlier prompt   ...][ block 3 ][ 512..529 ]              block 4: a partial record
    this prompt      ...][ block 3 ][ 512..529 | 530..639 ][...  block 4: those 18 tokens
                                                                 load, the rest computes

A step's plan (:class:`StepPlan`) lists loads (store -> the blocks just allocated, before the
forward pass) and saves (every prompt block whose tokens are all computed after this step and
which is not known to be stored yet: the partial last block once the whole prompt is).
Decode-time blocks are not saved: the store holds prompts. A partial block's record is the
whole block: its slots past the prompt hold what this instance last wrote there (its own
KV, under its own tenant's keys), which a reader's attention never reads and its decode
overwrites.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass, field

from kvcake.common.hashing import hash_partial_block, prefix_block_hashes
from kvcake.vllm.pd import prompt_blocks


def prompt_block_hashes(tokens: Sequence[int], block_size: int, salt: bytes) -> list[bytes]:
    """Keys of a prompt's blocks: its full blocks' (:func:`prefix_block_hashes`, as the
    Conductor makes them), then its partial last block's. A prompt shorter than one block
    gets none: its KV is cheap to compute, and its record would cost a whole block."""
    keys = prefix_block_hashes(tokens, block_size, salt)
    tail = tokens[len(keys) * block_size:]
    if keys and tail:
        keys.append(hash_partial_block(keys[-1], tail, salt))
    return keys


def tail_candidates(tokens: Sequence[int], block: int, block_size: int, parent: bytes,
                    salt: bytes) -> list[tuple[int, bytes]]:
    """``(count, key)`` of every partial record an earlier prompt with this one's tokens up to
    ``block`` may have stored at ``block`` (its parent the full block ``parent``): one per
    token count that leaves this prompt's last token to compute, longest first."""
    start = block * block_size
    most = min(block_size - 1, len(tokens) - 1 - start)
    return [(count, hash_partial_block(parent, tokens[start:start + count], salt))
            for count in range(most, 0, -1)]


def loadable_blocks(num_prompt_tokens: int, block_size: int) -> int:
    """Prompt blocks that may come from the store: those holding a token before the last
    (the last token is always computed)."""
    return prompt_blocks(max(num_prompt_tokens - 1, 0), block_size)


def complete_blocks(num_done_tokens: int, num_prompt_tokens: int, block_size: int) -> int:
    """Prompt blocks whose tokens are all computed: the partial last block once every
    prompt token is."""
    if num_done_tokens >= num_prompt_tokens:
        return prompt_blocks(num_prompt_tokens, block_size)
    return num_done_tokens // block_size


@dataclass(frozen=True)
class BlockRun:
    """Consecutive blocks of one request: vLLM block ids and their prefix hashes, in order."""

    request_id: str
    block_ids: tuple[int, ...]
    block_hashes: tuple[bytes, ...]


@dataclass
class StepPlan:
    """What the workers do around one forward pass: ``loads`` before it, ``saves`` after."""

    loads: list[BlockRun] = field(default_factory=list)
    saves: list[BlockRun] = field(default_factory=list)


@dataclass
class _Tracked:
    block_hashes: Sequence[bytes]  # the prompt's blocks, the partial last one too
    num_prompt_tokens: int
    saved_blocks: int = 0  # blocks [0, saved) are stored or on their way
    load: tuple[int, int] | None = None  # (first block, count) for the next step
    tail: tuple[int, bytes] | None = None  # (block, key): an earlier prompt's record there


class StorePlan:
    """Per-request bookkeeping of the scheduler-side connector."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._requests: dict[str, _Tracked] = {}

    def lookup(self, request_id: str, block_hashes: Sequence[bytes], num_prompt_tokens: int,
               num_computed_tokens: int) -> tuple[int, int]:
        """Track the request; the block range ``[first, stop)`` worth asking the store about
        (empty when the local cache already covers every loadable block)."""
        stop = min(loadable_blocks(num_prompt_tokens, self.block_size), len(block_hashes))
        first = min(num_computed_tokens // self.block_size, stop)
        # blocks of the local cache were saved when computed, or came from the store
        tracked = self._requests.setdefault(
            request_id, _Tracked(block_hashes, num_prompt_tokens, saved_blocks=first))
        tracked.block_hashes = block_hashes  # a resumed request keeps its list
        tracked.tail = None
        return first, stop

    def tail_lookup(self, request_id: str, tokens: Sequence[int], block: int,
                    salt: bytes) -> list[tuple[int, bytes]]:
        """The partial records worth asking the store about at ``block``, where the chain of
        the request's blocks stopped (:func:`tail_candidates`; none where ``block`` has no
        full parent or no token before the prompt's last)."""
        tracked = self._requests[request_id]
        whole = len(tokens) // self.block_size
        if not 1 <= block <= min(whole, len(tracked.block_hashes)):
            return []
        return tail_candidates(tokens, block, self.block_size, tracked.block_hashes[block - 1],
                               salt)

    def tail_hit(self, request_id: str, block: int, key: bytes) -> None:
        """The store holds ``key``, one of :meth:`tail_lookup`'s: load it at ``block``."""
        self._requests[request_id].tail = (block, key)

    def matched_tokens(self, num_prompt_tokens: int, num_computed_tokens: int, first: int,
                       hits: int, tail_tokens: int = 0) -> int:
        """Tokens the store adds after the ``hits`` leading blocks from ``first`` exist, and
        then ``tail_tokens`` of a partial record (never the prompt's last token)."""
        covered = min((first + hits) * self.block_size + tail_tokens, num_prompt_tokens - 1)
        return max(covered - num_computed_tokens, 0)

    def allocated(self, request_id: str, num_computed_tokens: int,
                  num_external_tokens: int) -> None:
        """vLLM gave the request blocks for ``num_external_tokens`` store tokens."""
        tracked = self._requests.get(request_id)
        if tracked is None or num_external_tokens <= 0:
            return
        first = num_computed_tokens // self.block_size
        count = prompt_blocks(num_computed_tokens + num_external_tokens, self.block_size) - first
        tracked.load = (first, count)
        if tracked.tail is not None and tracked.tail[0] != first + count - 1:
            tracked.tail = None  # vLLM took fewer tokens than the record's
        # already stored, but a block loaded from another prompt's record: under its own key
        # it is stored once computed
        stored = first + count - (tracked.tail is not None)
        tracked.saved_blocks = max(tracked.saved_blocks, stored)

    def step(self, scheduled: dict[str, int], computed: Callable[[str], int],
             block_ids: Callable[[str], Sequence[int]]) -> StepPlan:
        """The plan of a step: ``scheduled`` maps each request to its tokens this step,
        ``computed`` gives a request's computed tokens before it, ``block_ids`` its blocks."""
        plan = StepPlan()
        for request_id, tracked in self._requests.items():
            if request_id not in scheduled:
                continue
            ids = block_ids(request_id)
            if tracked.load is not None:
                plan.loads.append(self._load_run(request_id, tracked, ids))
                tracked.load = None
            done = computed(request_id) + scheduled[request_id]
            full = complete_blocks(done, tracked.num_prompt_tokens, self.block_size)
            full = min(full, len(tracked.block_hashes), len(ids))
            if full > tracked.saved_blocks:
                first = tracked.saved_blocks
                plan.saves.append(self._run(request_id, tracked, ids, first, full - first))
                tracked.saved_blocks = full
        return plan

    def _load_run(self, request_id: str, tracked: _Tracked, ids: Sequence[int]) -> BlockRun:
        assert tracked.load is not None
        run = self._run(request_id, tracked, ids, *tracked.load)
        if tracked.tail is None:
            return run
        _, key = tracked.tail
        tracked.tail = None
        return BlockRun(request_id, run.block_ids, (*run.block_hashes[:-1], key))

    @staticmethod
    def _run(request_id: str, tracked: _Tracked, ids: Sequence[int], first: int,
             count: int) -> BlockRun:
        stop = first + count
        return BlockRun(request_id, tuple(ids[first:stop]),
                        tuple(tracked.block_hashes[first:stop]))

    def loads_failed(self, invalid: Set[int], block_ids: Callable[[str], Sequence[int]]
                     ) -> None:
        """Blocks ``invalid`` did not load: vLLM computes a request's blocks from its first
        invalid one again, and they are saved once computed (the workers saved nothing of
        such a request in that step)."""
        for request_id, tracked in self._requests.items():
            first = next((i for i, block in enumerate(block_ids(request_id))
                          if block in invalid), None)
            if first is not None:
                tracked.saved_blocks = min(tracked.saved_blocks, first)

    def finished(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._requests)
