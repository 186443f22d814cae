"""A trace request as it moves through the simulated cluster, and what became of it.

Lifecycle (one table; :meth:`SimRequest.move` refuses anything else)::

    ARRIVED ──route──▶ PREFILLING ──first token──▶ TRANSFERRING ──KV in──▶ DECODE_WAITING
       │                   │ (output of 1 token: FINISHED)                      │
       ▼                   ▼                                    seat free ──▶ DECODING
    REJECTED            FINISHED (colocated: straight to DECODE_WAITING)        │
                                               REJECTED (at decode) ◀── KV in   ▼
                                                                            FINISHED
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from kvcake.common.lifecycle import Lifecycle


class Phase(StrEnum):
    ARRIVED = "arrived"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DECODE_WAITING = "decode_waiting"
    DECODING = "decoding"
    FINISHED = "finished"
    REJECTED = "rejected"


TRANSITIONS = Lifecycle({
    Phase.ARRIVED: frozenset({Phase.PREFILLING, Phase.REJECTED}),
    Phase.PREFILLING: frozenset({Phase.TRANSFERRING, Phase.DECODE_WAITING, Phase.FINISHED}),
    Phase.TRANSFERRING: frozenset({Phase.DECODE_WAITING, Phase.REJECTED}),
    Phase.DECODE_WAITING: frozenset({Phase.DECODING}),
    Phase.DECODING: frozenset({Phase.FINISHED}),
    Phase.FINISHED: frozenset(),
    Phase.REJECTED: frozenset(),
})


@dataclass(eq=False)
class SimRequest:
    """One request. ``block_keys`` name its full prompt blocks at the profile's block size
    (a key covers its block and everything before it, as a trace hash id does).

    Times are simulated seconds. ``num_output_tokens`` counts the first token, which the
    prefill produces; the rest are decode steps.
    """

    request_id: str
    row: int
    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    block_keys: tuple[str, ...]
    block_tokens: int  # tokens per block key
    phase: Phase = Phase.ARRIVED
    prefill_id: str = ""
    decode_id: str = ""
    pull_from: str | None = None  # where the Conductor said the extra prefix comes from
    rejected_reason: str | None = None
    local_blocks: int = 0  # prefix blocks its prefill instance held itself
    pulled_blocks: int = 0  # prefix blocks it loaded from another instance or the pool
    prefill_start_s: float | None = None  # its first chunk's step began
    num_computed: int = 0  # prompt tokens computed so far (beyond the reused prefix)
    last_chunk_tokens: int = 0  # its final chunk: that KV is sent after the first token
    first_token_s: float | None = None
    decode_join_step: int = -1  # first decode step it took part in, on its decode instance
    first_gap_s: float = 0.0  # first token -> second token (transfer, wait and one step)
    finish_s: float | None = None
    tbt_s: float | None = None  # mean of the slowest 10 % of gaps (None: a single token)
    gaps: list[float] = field(default_factory=list)  # kept only when asked (tests, plots)

    def move(self, to: Phase) -> None:
        self.phase = TRANSITIONS.move(self.phase, to, "request %r", self.request_id)

    @property
    def reused_tokens(self) -> int:
        return (self.local_blocks + self.pulled_blocks) * self.block_tokens

    @property
    def num_to_compute(self) -> int:
        """Prompt tokens its prefill computes: all but the reused prefix."""
        return self.num_prompt_tokens - self.reused_tokens

    @property
    def num_decode_steps(self) -> int:
        return self.num_output_tokens - 1

    @property
    def context_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s
