"""Routing policies, by name (STYLE.md §12): the server and the simulator use the same classes.

The service prices every candidate prefill instance twice, local prefix only and with
Algorithm 1's pull of a better remote prefix, and every candidate decode instance by its
predicted TBT. A policy only picks among those estimates:

====================  ===================================================================
``random``            uniform (seeded), prefill and decode independently
``round_robin``       next in sorted-id order after the last one routed, each role its own
``least_loaded``      prefill: smallest queue; decode: smallest predicted TBT
``cache_aware``       prefill: smallest TTFT reusing the local prefix only; decode: TBT
``kvcache_centric``   prefill: smallest TTFT with Algorithm 1's remote pulls; decode: TBT
====================  ===================================================================

Only ``kvcache_centric`` pulls prefixes between instances; the others reuse what the chosen
instance holds itself. Candidates arrive sorted by instance id and never empty; every tie
goes to the lowest id.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from kvcake.common.errors import InvalidParamsError


@dataclass(frozen=True)
class PrefillEstimate:
    """A prefill instance priced for one request.

    local_hit_blocks: leading blocks it holds; reused_blocks: blocks it would not compute
    (local plus pulled); pull_from: holder of the pulled blocks (instance id or ``"store"``),
    ``None`` when nothing is pulled. Times in seconds, as the instance's drain fit scales
    them; ``unscaled``: (queue, transfer, prefill) as the cost model gives them (the same
    when not given).
    """

    instance_id: str
    local_hit_blocks: int
    reused_blocks: int
    pull_from: str | None
    queue_s: float
    transfer_s: float
    prefill_s: float
    unscaled: tuple[float, float, float] | None = None

    @property
    def cost_model_s(self) -> tuple[float, float, float]:
        """(queue, transfer, prefill) seconds before the drain fit."""
        return self.unscaled or (self.queue_s, self.transfer_s, self.prefill_s)

    @property
    def ttft_s(self) -> float:
        return self.queue_s + self.transfer_s + self.prefill_s


@dataclass(frozen=True)
class DecodeEstimate:
    """A decode instance priced for one request: its step time with the request added."""

    instance_id: str
    tbt_s: float


_Estimate = TypeVar("_Estimate", PrefillEstimate, DecodeEstimate)


class Policy(ABC):
    """Picks a prefill and a decode instance among priced candidates."""

    name: ClassVar[str]

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    @abstractmethod
    def choose_prefill(self, local: Sequence[PrefillEstimate],
                       pulled: Sequence[PrefillEstimate]) -> PrefillEstimate:
        """One of ``local`` (local prefix only) or ``pulled`` (Algorithm 1); both hold the same
        instances in the same order."""

    def choose_decode(self, candidates: Sequence[DecodeEstimate]) -> DecodeEstimate:
        """The decode instance; by default the smallest predicted TBT."""
        return min(candidates, key=lambda e: e.tbt_s)

    def routed(self, prefill_id: str, decode_id: str) -> None:  # noqa: B027 (optional hook)
        """The request was admitted to these instances (a rejected one never gets here)."""


class RandomPolicy(Policy):
    name = "random"

    def choose_prefill(self, local: Sequence[PrefillEstimate],
                       pulled: Sequence[PrefillEstimate]) -> PrefillEstimate:
        return self.rng.choice(local)

    def choose_decode(self, candidates: Sequence[DecodeEstimate]) -> DecodeEstimate:
        return self.rng.choice(candidates)


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._last_prefill = ""  # "" sorts before every id: the cycle starts at the lowest
        self._last_decode = ""

    def choose_prefill(self, local: Sequence[PrefillEstimate],
                       pulled: Sequence[PrefillEstimate]) -> PrefillEstimate:
        return _next_after(local, self._last_prefill)

    def choose_decode(self, candidates: Sequence[DecodeEstimate]) -> DecodeEstimate:
        return _next_after(candidates, self._last_decode)

    def routed(self, prefill_id: str, decode_id: str) -> None:
        self._last_prefill, self._last_decode = prefill_id, decode_id


def _next_after(candidates: Sequence[_Estimate], last: str) -> _Estimate:
    """The first candidate whose id sorts after ``last``, wrapping round; an id cursor (not an
    index) keeps the cycle fair when instances come and go."""
    return next((e for e in candidates if e.instance_id > last), candidates[0])


class LeastLoadedPolicy(Policy):
    name = "least_loaded"

    def choose_prefill(self, local: Sequence[PrefillEstimate],
                       pulled: Sequence[PrefillEstimate]) -> PrefillEstimate:
        return min(local, key=lambda e: (e.queue_s, e.ttft_s))


class CacheAwarePolicy(Policy):
    name = "cache_aware"

    def choose_prefill(self, local: Sequence[PrefillEstimate],
                       pulled: Sequence[PrefillEstimate]) -> PrefillEstimate:
        return min(local, key=lambda e: e.ttft_s)


class KVCacheCentricPolicy(Policy):
    name = "kvcache_centric"

    def choose_prefill(self, local: Sequence[PrefillEstimate],
                       pulled: Sequence[PrefillEstimate]) -> PrefillEstimate:
        return min(pulled, key=lambda e: e.ttft_s)


POLICIES: dict[str, type[Policy]] = {
    policy.name: policy for policy in (RandomPolicy, RoundRobinPolicy, LeastLoadedPolicy,
                                       CacheAwarePolicy, KVCacheCentricPolicy)
}


def make_policy(name: str, rng: random.Random) -> Policy:
    """The policy called ``name``; ``InvalidParamsError`` naming the known ones otherwise."""
    try:
        return POLICIES[name](rng)
    except KeyError:
        raise InvalidParamsError(
            f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
