"""Where an object's replicas go, by name (STYLE.md §12); always on segments of distinct
names (as Mooncake places by segment name, several segments sharing a name, e.g. two clients
known by one hostname, count as one place).

====================  ==============================================================
``random``            uniformly among segments with room (Mooncake's default)
``free_ratio_first``  the emptiest segments first (fraction free), spreading load
``local_first``       the writer's own segments first, then ``free_ratio_first``
====================  ==============================================================
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from kvcake.common.errors import InvalidParamsError


class Candidate(Protocol):
    """What a policy may know about a mounted segment."""

    @property
    def segment_id(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def client_id(self) -> str: ...
    @property
    def free_ratio(self) -> float: ...

    def can_allocate(self, nbytes: int) -> bool: ...


@dataclass(frozen=True)
class PlacementRequest:
    """``preferred_segment`` and then ``preferred``: segment names to use first, in this
    order, whatever the policy (a name several segments share ranks them all)."""

    size: int
    replica_num: int
    client_id: str  # who is writing (for local_first)
    preferred_segment: str = ""
    preferred: tuple[str, ...] = ()

    def rank(self, name: str) -> int:
        order = (self.preferred_segment, *self.preferred) if self.preferred_segment \
            else self.preferred
        return order.index(name) if name in order else len(order)


class PlacementPolicy(ABC):
    name: ClassVar[str]

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, request: PlacementRequest, segments: Sequence[Candidate]) -> list[int]:
        """Ids of up to ``replica_num`` segments of distinct names that can hold ``size``
        bytes, best first; fewer (or none) when fewer have room. A request's preferred
        segments go first whatever the policy."""
        fitting = [s for s in segments if s.can_allocate(request.size)]
        ordered = self.order(request, fitting)
        if request.preferred_segment or request.preferred:  # stable: the policy breaks ties
            ordered.sort(key=lambda s: request.rank(s.name))
        firsts = {s.name: s for s in reversed(ordered)}  # each name's best segment
        distinct = [s for s in ordered if firsts[s.name] is s]
        return [s.segment_id for s in distinct[: request.replica_num]]

    @abstractmethod
    def order(self, request: PlacementRequest, fitting: list[Candidate]) -> list[Candidate]:
        """``fitting`` sorted best first."""


class RandomPlacement(PlacementPolicy):
    name = "random"

    def order(self, request: PlacementRequest, fitting: list[Candidate]) -> list[Candidate]:
        return self.rng.sample(fitting, len(fitting))


class FreeRatioFirstPlacement(PlacementPolicy):
    name = "free_ratio_first"

    def order(self, request: PlacementRequest, fitting: list[Candidate]) -> list[Candidate]:
        return sorted(fitting, key=lambda s: (-s.free_ratio, s.segment_id))


class LocalFirstPlacement(FreeRatioFirstPlacement):
    name = "local_first"

    def order(self, request: PlacementRequest, fitting: list[Candidate]) -> list[Candidate]:
        ordered = super().order(request, fitting)
        return sorted(ordered, key=lambda s: s.client_id != request.client_id)  # stable


PLACEMENT_POLICIES: dict[str, type[PlacementPolicy]] = {
    policy.name: policy for policy in (RandomPlacement, FreeRatioFirstPlacement,
                                       LocalFirstPlacement)
}


def make_placement_policy(name: str, rng: random.Random) -> PlacementPolicy:
    try:
        return PLACEMENT_POLICIES[name](rng)
    except KeyError:
        raise InvalidParamsError(
            f"unknown placement policy {name!r}; known: {', '.join(sorted(PLACEMENT_POLICIES))}"
        ) from None
