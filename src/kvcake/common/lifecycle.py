"""One helper for every lifecycle table (a store replica, an engine request, a Conductor
flight, a simulated request): the legal moves of an enum's states, checked in one place,
refused one way.

    REPLICA = Lifecycle({INITIALIZED: {PROCESSING, FAILED}, PROCESSING: {COMPLETE}, ...})
    replica.state = REPLICA.move(replica.state, COMPLETE, "replica on segment %d", 3)

A state with no moves out is final. An illegal move raises :class:`IllegalTransitionError`
naming the subject and the edge, and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from enum import Enum
from typing import Generic, TypeVar

from kvcake.common.errors import ErrorCode, InvalidParamsError

S = TypeVar("S", bound=Enum)


class IllegalTransitionError(InvalidParamsError):
    """Something was asked to move along an edge its lifecycle table does not have."""


class Lifecycle(Mapping[S, frozenset[S]], Generic[S]):
    """The legal moves of a state machine: every state of the enum maps to the states it
    may move to. ``code`` is the error code of a refused move."""

    def __init__(self, moves: Mapping[S, Iterable[S]],
                 code: ErrorCode = ErrorCode.INVALID_PARAMS) -> None:
        self._moves = {state: frozenset(targets) for state, targets in moves.items()}
        states = set(type(next(iter(self._moves))))
        if set(self._moves) != states:
            missing = sorted(str(s) for s in states - set(self._moves))
            raise ValueError(f"a lifecycle table lists every state; missing {missing}")
        self.code = code

    def __getitem__(self, state: S) -> frozenset[S]:
        return self._moves[state]

    def __iter__(self) -> Iterator[S]:
        return iter(self._moves)

    def __len__(self) -> int:
        return len(self._moves)

    def final(self, state: S) -> bool:
        return not self._moves[state]

    def move(self, old: S, new: S, subject: str, *args: object) -> S:
        """``new`` when ``old -> new`` is legal; else IllegalTransitionError naming
        ``subject % args`` (formatted only then: a legal move costs a lookup)."""
        if new not in self._moves[old]:
            raise IllegalTransitionError(f"{subject % args}: {old} -> {new} is not a legal "
                                         f"move", self.code)
        return new
