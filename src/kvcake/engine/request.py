"""A request inside the engine, and its lifecycle as a transition table.

::

    WAITING --schedule--> RUNNING --stop/length--> FINISHED_STOPPED / FINISHED_LENGTH
       ^                     |
       +----- preempt -------+          (any live state) --abort--> FINISHED_ABORTED

Token ranges of a request (``B`` = block size)::

    | prompt_token_ids ............ | output_token_ids ...... |
    |<- num_computed_tokens ->|<- scheduled this step ->|
    |<- num_cached_tokens ->|   (came from the local cache or the store; never recomputed)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from kvcake.common.errors import InvalidParamsError
from kvcake.common.hashing import ROOT_DIGEST, prefix_block_hashes
from kvcake.common.lifecycle import Lifecycle
from kvcake.engine.model.logprobs import PromptLogprobs
from kvcake.wire.output import TopLogprobs
from kvcake.wire.sampling import SamplingParams


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return TRANSITIONS.final(self)


_FINISHED = {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
             RequestStatus.FINISHED_ABORTED}
TRANSITIONS = Lifecycle({
    RequestStatus.WAITING: frozenset({RequestStatus.RUNNING, RequestStatus.FINISHED_ABORTED}),
    RequestStatus.RUNNING: frozenset(_FINISHED | {RequestStatus.WAITING}),
    RequestStatus.FINISHED_STOPPED: frozenset(),
    RequestStatus.FINISHED_LENGTH: frozenset(),
    RequestStatus.FINISHED_ABORTED: frozenset(),
})


@dataclass
class Request:
    """One generation request: its tokens, progress, KV blocks and block hashes."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    salt: bytes
    arrival_s: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)  # of prompt tokens 1..n-1
    prompt_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_store_tokens: int = 0
    num_preemptions: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    generator: torch.Generator | None = None
    first_token_s: float | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise InvalidParamsError(f"request {self.request_id!r}: the prompt is empty")
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    def move_to(self, status: RequestStatus) -> None:
        """Change status; an illegal move (a bug in the caller) is refused."""
        self.status = TRANSITIONS.move(self.status, status, "request %r", self.request_id)

    @property
    def namespace(self) -> str:
        """``<model fingerprint>/<tenant>``: the salt as text, the prefix of store keys."""
        return self.salt.decode()

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output (without joining the two lists)."""
        prompt_len = self.num_prompt_tokens
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len:end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - prompt_len]

    def extend_block_hashes(self, block_size: int) -> None:
        """Hash every full block of known tokens not hashed yet (chained, salted)."""
        done = len(self.block_hashes)
        if (done + 1) * block_size > self.num_tokens:
            return
        parent = self.block_hashes[-1] if done else ROOT_DIGEST
        tokens = self.token_slice(done * block_size, self.num_tokens)
        self.block_hashes += prefix_block_hashes(tokens, block_size, self.salt, parent)

    def record_prompt_logprobs(self, scores: PromptLogprobs) -> None:
        """Keep a chunk's prompt scores (a recomputed chunk overwrites its earlier ones)."""
        at = scores.first - 1
        assert at <= len(self.prompt_logprobs), "prompt chunks are scored in order"
        self.prompt_logprobs[at:] = scores.logprobs
        self.prompt_top_logprobs[at:] = scores.top_logprobs

    def reset_for_recompute(self) -> None:
        """Preempted: its blocks are gone, so everything is computed again later."""
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_store_tokens = 0
        self.block_ids = []
        self.num_preemptions += 1
