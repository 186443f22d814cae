"""Continuous batching with chunked prefill, a token budget per step and recompute preemption.

A step is three phases:

1. **running**: each running request gets its next chunk (1 token when decoding, up to the
   budget when prefilling). If the pool is full, the most recently admitted request is
   preempted (its blocks freed; it recomputes later) until the chunk fits.
2. **waiting**: new (or preempted) requests are admitted in arrival order while the budget,
   ``max_num_seqs`` and the pool allow. Admission first takes the longest cached prefix, from
   the local cache, then from the store through the connector; only the rest is computed.
3. **update** (after the model ran): progress, newly full blocks published (and offered to
   the connector for saving), sampled tokens appended, stop conditions applied.

The scheduler does no tensor work and no I/O of its own: the connector it is given does the
store traffic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from kvcake.engine.kv.manager import KVCacheManager
from kvcake.engine.model.logprobs import PromptLogprobs
from kvcake.engine.request import Request, RequestStatus
from kvcake.wire.output import TopLogprobs


class KVConnector(Protocol):
    """Where KV blocks come from and go to beyond the local cache (the kvcake store)."""

    def num_matched_blocks(self, prefix: str, block_hashes: list[bytes]) -> int:
        """How many leading blocks of ``block_hashes`` can be loaded (``prefix`` names the
        model and tenant the hashes belong to)."""
        ...

    def load(self, prefix: str, block_ids: list[int], block_hashes: list[bytes]) -> int:
        """Fill ``block_ids`` with the stored blocks; returns how many leading ones are valid."""
        ...

    def save(self, prefix: str, block_ids: list[int], block_hashes: list[bytes]) -> None:
        """Offer full blocks for storing (asynchronously: must not block the step)."""
        ...


@dataclass(frozen=True)
class ScheduledChunk:
    """``num_tokens`` tokens of ``request`` starting at position ``start`` run this step."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the request's last known token (so a token is drawn)."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float
    top_logprobs: TopLogprobs = field(default_factory=list)


@dataclass(frozen=True)
class RunnerOutput:
    """What one model run produced: drawn tokens and prompt scores, by request id."""

    sampled: dict[str, SampledToken]
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)


class Scheduler:
    """Owns the waiting and running queues and the KV cache manager."""

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, connector: KVConnector | None = None,
                 eos_token_ids: Iterable[int] = ()) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.connector = connector
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    @property
    def block_size(self) -> int:
        return self.kv.block_size

    def add(self, request: Request) -> None:
        request.extend_block_hashes(self.block_size)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Join a request whose prompt K/V is already in its blocks (a disaggregated decode):
        it skips the waiting queue and decodes from the next step on."""
        request.extend_block_hashes(self.block_size)
        self.requests[request.request_id] = request
        request.move_to(RequestStatus.RUNNING)
        self.running.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- phase 1 and 2 -----------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        budget = self._schedule_running(budget, chunks, preempted)
        if not preempted:
            self._schedule_waiting(budget, chunks)
        return SchedulerOutput(tuple(chunks), tuple(preempted))

    def _schedule_running(self, budget: int, chunks: list[ScheduledChunk],
                          preempted: list[str]) -> int:
        for request in list(self.running):
            if budget <= 0 or request.status is not RequestStatus.RUNNING:
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status is RequestStatus.RUNNING:
                chunks.append(ScheduledChunk(request, request.num_computed_tokens, n))
                budget -= n
        return budget

    def _schedule_waiting(self, budget: int, chunks: list[ScheduledChunk]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            n = self._admit(request, budget)
            if n == 0:
                return
            self.waiting.popleft()
            request.move_to(RequestStatus.RUNNING)
            self.running.append(request)
            chunks.append(ScheduledChunk(request, request.num_computed_tokens, n))
            budget -= n

    def _admit(self, request: Request, budget: int) -> int:
        """Attach cached prefix blocks and room for the first chunk; 0 if it does not fit."""
        local = self.kv.take_local_hit(request)
        store = self._store_hit_blocks(request, local)
        hit_end = self.kv.hit_tokens(request, local + store)
        n = min(request.num_tokens - hit_end, budget)
        end = max(hit_end + n, (local + store) * self.block_size)
        if not self.kv.can_allocate(self.kv.blocks_needed(request,
                                                          end - request.num_computed_tokens)):
            self.kv.free(request)
            request.num_computed_tokens = request.num_cached_tokens = 0
            return 0
        if store:
            self._load_from_store(request, store)
        n = min(request.num_tokens - request.num_computed_tokens, budget)
        allocated = self.kv.allocate_slots(request, n)
        assert allocated, "room was checked before the store load"
        return n

    def _store_hit_blocks(self, request: Request, local: int) -> int:
        if self.connector is None:
            return 0
        wanted = request.block_hashes[local:self.kv.max_hit_blocks(request)]
        return self.connector.num_matched_blocks(request.namespace, wanted) if wanted else 0

    def _load_from_store(self, request: Request, count: int) -> None:
        assert self.connector is not None
        first = len(request.block_ids)
        block_ids = self.kv.allocate_blocks(request, count)
        assert block_ids is not None
        valid = self.connector.load(request.namespace, block_ids,
                                    request.block_hashes[first:first + count])
        loaded = self.kv.hit_tokens(request, first + valid) - request.num_computed_tokens
        request.num_computed_tokens += loaded
        request.num_cached_tokens += loaded
        request.num_store_tokens += loaded
        self.kv.register_full_blocks(request)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.reset_for_recompute()
        request.move_to(RequestStatus.WAITING)
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    # -- phase 3 ----------------------------------------------------------------------

    def update(self, output: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Apply a step's results; returns the requests that got a token or finished."""
        touched: list[Request] = []
        for chunk in output.chunks:
            request = chunk.request
            if request.status is not RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += chunk.num_tokens
            self._publish_blocks(request, chunk)
            scores = result.prompt_logprobs.get(request.request_id)
            if scores is not None:
                request.record_prompt_logprobs(scores)
            token = result.sampled.get(request.request_id)
            if token is not None:
                self._append(request, token)
                touched.append(request)
        return touched

    def _publish_blocks(self, request: Request, chunk: ScheduledChunk) -> None:
        first = chunk.start // self.block_size
        self.kv.register_full_blocks(request)
        done = request.num_computed_tokens // self.block_size
        prompt_blocks = min(done, request.num_prompt_tokens // self.block_size)
        if self.connector is not None and prompt_blocks > first:
            self.connector.save(request.namespace, request.block_ids[first:prompt_blocks],
                                request.block_hashes[first:prompt_blocks])

    def _append(self, request: Request, token: SampledToken) -> None:
        request.output_token_ids.append(token.token_id)
        request.output_logprobs.append(token.logprob)
        request.output_top_logprobs.append(token.top_logprobs)
        request.extend_block_hashes(self.block_size)
        status = self._stop_status(request, token.token_id)
        if status is not None:
            self.finish(request.request_id, status)

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.params
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and len(request.output_token_ids) >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request (stop string, abort, ...) and free its blocks; unknown ids: None."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        request.move_to(status)
        return request

