"""The Conductor's own records: a request to route, a decision, its stats —
frozen dataclasses that the server and the simulator build in process (what instances send
it is in :mod:`kvcake.wire.conductor`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcake.common.config import check_at_least, require
from kvcake.wire.conductor import InstanceLoad

STORE = "store"  # ``Decision.pull_from`` when the extra prefix comes from the shared store tier

# ----- in process
@dataclass(frozen=True)
class RouteRequest:
    """A request to place.

    block_hashes: the prompt's full blocks, chained, in order (a partial tail has no hash).
    num_output_tokens: expected decode length (the request's ``max_tokens``, >= 1).
    store_hit_blocks: leading blocks the shared store tier holds (the caller looked them up).
    """

    request_id: str
    num_prompt_tokens: int
    block_hashes: tuple[bytes, ...]
    num_output_tokens: int
    store_hit_blocks: int = 0

    def __post_init__(self) -> None:
        require(bool(self.request_id), "request_id must not be empty")
        check_at_least(self, 1, "num_prompt_tokens", "num_output_tokens")
        require(0 <= self.store_hit_blocks <= len(self.block_hashes),
                f"store_hit_blocks must be 0..{len(self.block_hashes)} (the number of "
                f"block_hashes), got {self.store_hit_blocks}")

    @property
    def context_tokens(self) -> int:
        """Tokens this request holds in a decode batch by its end: prompt plus output."""
        return self.num_prompt_tokens + self.num_output_tokens


@dataclass(frozen=True)
class Decision:
    """Where a request goes, or why it does not.

    reason: ``None`` when accepted, else a short code (``ttft_slo``, ``tbt_slo``,
        ``no_prefill_instance``, ``no_decode_instance``); ``detail`` carries the numbers.
    prefill_id, decode_id: the chosen instances (``decode_id == prefill_id`` for a ``both``
        instance); on an SLO rejection, the instances that were considered.
    local_hit_blocks: prefix blocks the prefill instance holds itself.
    reused_blocks: prefix blocks it reuses in all (local plus pulled).
    pull_from: where the pulled blocks come from: an instance id or ``"store"``; ``None``
        when nothing is pulled.
    """

    request_id: str
    accepted: bool
    reason: str | None
    detail: str
    prefill_id: str | None
    decode_id: str | None
    local_hit_blocks: int
    reused_blocks: int
    pull_from: str | None
    predicted_ttft_s: float
    predicted_tbt_s: float


@dataclass(frozen=True)
class InstanceStats:
    """One instance as the Conductor sees it.

    queue_s: predicted prefill seconds routed there and not yet done.
    drain: its drain fit's (queue, own) factors: what a predicted second of queue, and of a
        request's own prefill, take there (``kvcake.conductor.cost.DrainFit``).
    num_prefilling: requests prefilling there; num_heading: requests prefilling elsewhere
    that will decode there; num_decoding: requests decoding there.
    """

    role: str
    num_blocks: int
    queue_s: float
    num_prefilling: int
    num_heading: int
    num_decoding: int
    num_indexed_blocks: int
    load: InstanceLoad | None
    drain: tuple[float, float] = (1.0, 1.0)


@dataclass(frozen=True)
class PrefillTiming:
    """Seconds from routing to a prefill's end: predicted (with the drain fit), by the cost
    model alone, and observed."""

    predicted_s: float
    cost_model_s: float
    observed_s: float


@dataclass(frozen=True)
class ConductorStats:
    """A snapshot (the dicts are copies): instances by id, routed count, rejections by reason."""

    instances: dict[str, InstanceStats]
    num_routed: int
    num_in_flight: int
    rejections: dict[str, int]
    tbt_tail: float = 1.0  # the cost model's observed-TBT / predicted-step factor
