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
from collections.abc import Iterator
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
    def mark(self) -> None:
        """Start over the record of the keys inserted from now on (:meth:`since_mark`)."""

    @abstractmethod
    def unmark(self) -> None:
        """Stop recording inserted keys."""

    @abstractmethod
    def since_mark(self) -> list[str]:
        """The keys inserted since :meth:`mark` and still held, in order; empty unmarked."""

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
        self._since: dict[str, None] | None = None  # recorded inserts, while marked

    def insert(self, key: str) -> None:
        self._order[key] = None
        self._order.move_to_end(key)
        if self._since is not None:
            self._since[key] = None

    def touch(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def discard(self, key: str) -> None:
        self._order.pop(key, None)
        if self._since is not None:
            self._since.pop(key, None)

    def mark(self) -> None:
        self._since = {}

    def unmark(self) -> None:
        self._since = None

    def since_mark(self) -> list[str]:
        return list(self._since or ())

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
