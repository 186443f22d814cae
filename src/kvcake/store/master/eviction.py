"""Eviction order, by name (STYLE.md §12): the master and the simulator use the same classes.

A policy only orders keys; the caller decides which candidates it may really drop (not
leased, not pinned, not being written) and stops once enough space is free.

======  ===========================================================
``lru`` least recently *used* first (put_end and every read touch)
``fifo`` oldest *inserted* first (reads do not reorder)
======  ===========================================================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import ClassVar

from kvcake.common.errors import InvalidParamsError


class EvictionPolicy(ABC):
    """Keeps an order over the keys it was told about; iteration yields eviction candidates
    first to last. Iterating while changing the policy is not allowed (copy first)."""

    name: ClassVar[str]

    @abstractmethod
    def insert(self, key: str) -> None:
        """``key`` became evictable (a put completed)."""

    @abstractmethod
    def touch(self, key: str) -> None:
        """``key`` was read; a no-op for keys the policy does not hold."""

    @abstractmethod
    def discard(self, key: str) -> None:
        """``key`` is gone (removed, evicted, lost); a no-op when absent."""

    @abstractmethod
    def __iter__(self) -> Iterator[str]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...


class LruPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def insert(self, key: str) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def discard(self, key: str) -> None:
        self._order.pop(key, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order


class FifoPolicy(LruPolicy):
    name = "fifo"

    def touch(self, key: str) -> None:
        return


class SplitOrder(EvictionPolicy):
    """One policy's order over every key, and the same order within each part of the keys
    (``part_of(key)``: the master splits by tenant), kept in step, so a part's oldest keys
    are found without walking the others'. After :meth:`mark` it also records the keys
    inserted since (:meth:`since_mark`)."""

    name = "split"

    def __init__(self, policy: str, part_of: Callable[[str], str]) -> None:
        self.policy = policy
        self.whole = make_eviction_policy(policy)
        self._part_of = part_of
        self._parts: dict[str, EvictionPolicy] = {}
        self._since: dict[str, None] | None = None  # inserts since the mark, while marked

    def part(self, part: str) -> Iterator[str]:
        """The keys of ``part``, in order."""
        return iter(self._parts.get(part, ()))

    def insert(self, key: str) -> None:
        self.whole.insert(key)
        part = self._part_of(key)
        policy = self._parts.get(part)
        if policy is None:
            policy = self._parts[part] = make_eviction_policy(self.policy)
        policy.insert(key)
        if self._since is not None:
            self._since[key] = None

    def touch(self, key: str) -> None:
        self.whole.touch(key)
        policy = self._parts.get(self._part_of(key))
        if policy is not None:
            policy.touch(key)

    def discard(self, key: str) -> None:
        self.whole.discard(key)
        part = self._part_of(key)
        policy = self._parts.get(part)
        if policy is not None:
            policy.discard(key)
            if not len(policy):
                del self._parts[part]
        if self._since is not None:
            self._since.pop(key, None)

    def mark(self) -> None:
        """Start over the record of the keys inserted from now on."""
        self._since = {}

    def unmark(self) -> None:
        """Stop recording inserted keys."""
        self._since = None

    def since_mark(self) -> list[str]:
        """The keys inserted since :meth:`mark` and still held, in order; empty unmarked."""
        return list(self._since or ())

    def __iter__(self) -> Iterator[str]:
        return iter(self.whole)

    def __len__(self) -> int:
        return len(self.whole)

    def __contains__(self, key: object) -> bool:
        return key in self.whole

    def check_integrity(self) -> None:
        """Each part holds exactly the whole order's keys of that part, in the same order."""
        split: dict[str, list[str]] = {}
        for key in self.whole:
            split.setdefault(self._part_of(key), []).append(key)
        assert split == {part: list(order) for part, order in self._parts.items()}, "parts"


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {
    LruPolicy.name: LruPolicy,
    FifoPolicy.name: FifoPolicy,
}


def make_eviction_policy(name: str) -> EvictionPolicy:
    try:
        return EVICTION_POLICIES[name]()
    except KeyError:
        raise InvalidParamsError(
            f"unknown eviction policy {name!r}; known: {', '.join(sorted(EVICTION_POLICIES))}"
        ) from None
