"""Fixtures of the store's tests: server processes started by a test, stopped after it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvcake.ops import ServerProcess


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Append what a test starts; each is stopped after the test, the last started first."""
    started: list[ServerProcess] = []
    yield started
    for process in reversed(started):
        process.stop()
