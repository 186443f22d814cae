"""Fixtures of the store's tests: server processes started by a test, stopped after it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from kvcake.ops import ServerProcess
from kvcake.store import DistributedStore


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Append what a test starts; each is stopped after the test, the last started first."""
    started: list[ServerProcess] = []
    yield started
    for process in reversed(started):
        process.stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., DistributedStore]]:
    """Mooncake-API clients of a master (``setup`` options as keywords), closed after."""
    made: list[DistributedStore] = []

    def client(endpoint: str, **options: str) -> DistributedStore:
        store = DistributedStore()
        assert store.setup("127.0.0.1", "p2p", 0, 16 << 20, "tcp", "", endpoint,
                           **options) == 0
        made.append(store)
        return store

    yield client
    for store in made:
        store.close()
