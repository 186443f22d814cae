"""The lifecycle table helper: legal moves pass, others are refused the one way, and a table
must name every state."""

from __future__ import annotations

from enum import Enum

import pytest

from kvcake.common.errors import ErrorCode, InvalidParamsError
from kvcake.common.lifecycle import IllegalTransitionError, Lifecycle


class Light(Enum):
    RED = "red"
    GREEN = "green"
    OFF = "off"


TABLE = Lifecycle({Light.RED: {Light.GREEN, Light.OFF}, Light.GREEN: {Light.RED, Light.OFF},
                   Light.OFF: set()}, ErrorCode.INVALID_REPLICA)


def test_a_legal_move_returns_the_new_state() -> None:
    assert TABLE.move(Light.RED, Light.GREEN, "light %d", 1) is Light.GREEN
    assert TABLE.final(Light.OFF) and not TABLE.final(Light.RED)
    assert dict(TABLE)[Light.OFF] == frozenset()


def test_an_illegal_move_is_refused_naming_subject_and_edge() -> None:
    with pytest.raises(IllegalTransitionError, match=r"light 1: Light\.OFF -> Light\.RED") as err:
        TABLE.move(Light.OFF, Light.RED, "light %d", 1)
    assert err.value.code is ErrorCode.INVALID_REPLICA
    assert isinstance(err.value, InvalidParamsError)


def test_a_table_names_every_state() -> None:
    with pytest.raises(ValueError, match=r"Light\.OFF"):
        Lifecycle({Light.RED: {Light.GREEN}, Light.GREEN: {Light.RED}})
