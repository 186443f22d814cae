"""Shared fixtures: tiny engines in this process, and transfer peers in child processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvcake.common.auth import ClusterAuth
from kvcake.transfer import TransferEngine
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.peer import PeerProcess


@pytest.fixture
def make_engine() -> Iterator[Callable[..., TransferEngine]]:
    engines: list[TransferEngine] = []

    def factory(auth: ClusterAuth | None = None, **fields: Any) -> TransferEngine:
        fields.setdefault("timeout_s", 5.0)
        engine = TransferEngine(TransferConfig(**fields), auth=auth)
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        engine.close()


@pytest.fixture
def make_peer() -> Iterator[Callable[..., PeerProcess]]:
    peers: list[PeerProcess] = []

    def factory(name: str = "kv0", size: int = 8 << 20, **kwargs: Any) -> PeerProcess:
        peer = PeerProcess(name, size, **kwargs)
        peers.append(peer)
        return peer

    yield factory
    for peer in peers:
        peer.stop()
