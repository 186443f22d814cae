"""A simulated engine instance: continuous batching in steps, as kvcake's EngineCore runs.

One step holds every decoding request (one token each) and, in the token budget left,
prefill chunks of queued prompts in arrival order; a ``prefill`` instance has no decodes, a
``decode`` instance no prefills, a ``both`` (colocated) instance mixes them, so a long
prefill chunk stretches the token gaps of everything decoding beside it::

    step k:   [ decode batch (n tokens) | chunk of A | chunk of B ]   <= prefill_chunk_tokens
    seconds = decode_step_s(n, context) + Σ prefill_s(chunk, cached before it)
              (+ seconds to pull a prefix when a prompt starts)

Bookkeeping is O(1) per step whatever the batch: the running context grows by the batch
size each step, and each seated request is filed under the step it finishes in. A request's
gaps are read back from the step durations when it finishes.
"""

from __future__ import annotations

import heapq
import statistics
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvcake.common.latency import slowest_count
from kvcake.conductor.cost import CostModel
from kvcake.sim.cache import PoolCache
from kvcake.sim.events import EventKind, EventQueue
from kvcake.sim.profile import Profile
from kvcake.sim.request import Phase, SimRequest


class InstanceHooks(Protocol):
    """What an instance asks of the cluster around it."""

    def begin_prefill(self, instance: SimInstance, request: SimRequest) -> float:
        """A prompt gets its first chunk: settle its reused prefix (``local_blocks``,
        ``pulled_blocks``) and return the seconds spent pulling it."""

    def prefill_done(self, instance: SimInstance, request: SimRequest) -> None:
        """The prompt is computed; its first token exists now."""

    def decode_done(self, instance: SimInstance, request: SimRequest) -> None:
        """The request produced its last token."""

    def cache_changed(self, instance: SimInstance, stored: list[str],
                      removed: list[str]) -> None:
        """A prompt's blocks entered the instance's prefix cache (or were touched), and
        ``removed`` left it to make room, in that order."""


@dataclass(frozen=True)
class _Chunk:
    request: SimRequest
    num_tokens: int
    num_cached: int  # tokens of the prompt already in KV before this chunk
    last: bool  # completes the prompt


class SimInstance:
    """One instance of ``role`` (``prefill``, ``decode`` or ``both``)."""

    def __init__(self, instance_id: str, role: str, profile: Profile, cost: CostModel,
                 events: EventQueue, hooks: InstanceHooks, eviction: str = "lru",
                 keep_gaps: bool = False) -> None:
        self.instance_id = instance_id
        self.role = role
        self.profile = profile
        self.cost = cost
        self.events = events
        self.hooks = hooks
        self.keep_gaps = keep_gaps
        self.cache = PoolCache(profile.cache_blocks, eviction)
        self.prefill_queue: deque[SimRequest] = deque()
        self.decode_queue: deque[SimRequest] = deque()
        self.num_running = 0
        self.running_context = 0  # KV tokens the running batch holds now
        self.kv_reserved = 0  # KV tokens the running batch will hold at its end
        self._finish_at: dict[int, list[SimRequest]] = {}
        self.durations = array("d")  # seconds of step k at index k
        self.busy = False
        self.busy_s = 0.0

    # ----- work in
    def submit_prefill(self, request: SimRequest) -> None:
        self.prefill_queue.append(request)
        self._wake()

    def submit_decode(self, request: SimRequest) -> None:
        self.decode_queue.append(request)
        self._wake()

    @property
    def num_decode_waiting(self) -> int:
        return len(self.decode_queue)

    def _wake(self) -> None:
        if not self.busy:
            self._start_step()

    # ----- one step
    def _start_step(self) -> None:
        joined = self._seat_waiting()
        chunks, pull_s = self._take_chunks(self.profile.prefill_chunk_tokens - self.num_running)
        if not self.num_running and not chunks:
            self.busy = False
            return
        seconds = self._step_seconds(chunks) + pull_s
        self.busy = True
        self.events.schedule(self.events.now + seconds, EventKind.STEP_END,
                             _bind(self._end_step, seconds, chunks, joined))

    def _seat_waiting(self) -> list[SimRequest]:
        """Seat decode requests in arrival order while seats and KV last (the head of the
        queue waits for room; a lone request too big for the KV runs alone)."""
        joined: list[SimRequest] = []
        step = len(self.durations)
        while self.decode_queue and self._can_seat(self.decode_queue[0]):
            request = self.decode_queue.popleft()
            request.move(Phase.DECODING)
            request.decode_join_step = step
            self.num_running += 1
            self.running_context += request.num_prompt_tokens + 1
            self.kv_reserved += request.context_tokens
            self._finish_at.setdefault(step + request.num_decode_steps - 1, []).append(request)
            joined.append(request)
        return joined

    def _can_seat(self, request: SimRequest) -> bool:
        if self.num_running == 0:
            return True
        return (self.num_running < self.profile.max_batch and
                self.kv_reserved + request.context_tokens <= self.profile.decode_kv_tokens)

    def _take_chunks(self, budget: int) -> tuple[list[_Chunk], float]:
        """Prefill chunks for this step, oldest prompt first; the pull time of prompts that
        start now."""
        chunks: list[_Chunk] = []
        pull_s = 0.0
        while budget > 0 and self.prefill_queue:
            request = self.prefill_queue[0]
            if request.prefill_start_s is None:
                request.prefill_start_s = self.events.now
                pull_s += self.hooks.begin_prefill(self, request)
            remaining = request.num_to_compute - request.num_computed
            take = min(remaining, budget)
            chunks.append(_Chunk(request, take, request.reused_tokens + request.num_computed,
                                 take == remaining))
            request.num_computed += take
            budget -= take
            if take == remaining:
                request.last_chunk_tokens = take
                self.prefill_queue.popleft()
        return chunks, pull_s

    def _step_seconds(self, chunks: list[_Chunk]) -> float:
        seconds = self.cost.decode_step_s(self.num_running, self.running_context)
        if chunks:  # the fixed cost of a prefill step is paid once, not per chunk
            seconds += sum(self.cost.prefill_s(c.num_tokens, c.num_cached) for c in chunks)
            seconds -= (len(chunks) - 1) * self.profile.prefill_fixed_s
        return seconds

    def _end_step(self, seconds: float, chunks: list[_Chunk], joined: list[SimRequest]) -> None:
        step = len(self.durations)
        self.durations.append(seconds)
        self.busy_s += seconds
        now = self.events.now
        for request in joined:
            assert request.first_token_s is not None
            request.first_gap_s = now - request.first_token_s
        self.running_context += self.num_running  # one token more for each
        for request in self._finish_at.pop(step, []):
            self._finish(request, step, now)
        self._prefills_done([c.request for c in chunks if c.last], now)
        self._start_step()

    def _finish(self, request: SimRequest, step: int, now: float) -> None:
        self.num_running -= 1
        self.running_context -= request.context_tokens
        self.kv_reserved -= request.context_tokens
        request.finish_s = now
        gaps = self.durations[request.decode_join_step + 1: step + 1]
        count = slowest_count(len(gaps) + 1)
        slowest = heapq.nlargest(count, [request.first_gap_s, *gaps])
        request.tbt_s = statistics.fmean(slowest)
        if self.keep_gaps:
            request.gaps = [request.first_gap_s, *gaps]
        request.move(Phase.FINISHED)
        self.hooks.decode_done(self, request)

    def _prefills_done(self, requests: list[SimRequest], now: float) -> None:
        for request in requests:
            request.first_token_s = now
            removed = self.cache.admit(request.block_keys)
            self.hooks.cache_changed(self, list(request.block_keys), removed)
        for request in requests:
            self.hooks.prefill_done(self, request)


def _bind(method: Callable[[float, list[_Chunk], list[SimRequest]], None], seconds: float,
          chunks: list[_Chunk], joined: list[SimRequest]) -> Callable[[], None]:
    return lambda: method(seconds, chunks, joined)
