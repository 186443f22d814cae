"""A store whose master and node require the cluster token, in real processes on loopback."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvcake.common.errors import AuthenticationError, ErrorCode, KvcakeError
from kvcake.ops import ServerProcess, start_master, start_node
from kvcake.store import AsyncStore
from kvcake.store.config import StoreConfig
from kvcake.transfer.config import TransferConfig

TOKEN = "store-token-" + "e" * 24
StartStore = Callable[[], str]


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "cluster.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def secured_store(token_file: str) -> Iterator[str]:
    """A master and one 16 MiB node, both given ``--cluster-token-file``."""
    started: list[ServerProcess] = []
    try:
        master, endpoint = start_master("--cluster-token-file", token_file)
        started.append(master)
        started.append(start_node(endpoint, "16MiB", "--cluster-token-file", token_file))
        yield endpoint
    finally:
        for process in reversed(started):
            process.stop()


def _client(endpoint: str) -> AsyncStore:
    return AsyncStore(StoreConfig(master=endpoint), TransferConfig(transport="tcp"))


async def _round_trip(endpoint: str, values: dict[str, bytes]) -> dict[str, bytes]:
    store = _client(endpoint)
    await store.setup()
    try:
        assert await store.put_batch(list(values), list(values.values())) == [0] * len(values)
        got = await store.get_batch(list(values))
        return {key: value for key, value in zip(values, got, strict=True)
                if isinstance(value, bytes)}
    finally:
        await store.close()


def test_a_client_with_the_token_puts_and_gets_byte_exact_over_tcp(
        secured_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVCAKE_CLUSTER_TOKEN", TOKEN)
    rng = random.Random(7)
    values = {f"k{i}": rng.randbytes(rng.randrange(1, 1 << 20)) for i in range(12)}
    assert asyncio.run(_round_trip(secured_store, values)) == values


@pytest.mark.parametrize("token", ["", "a-wrong-token-" + "f" * 20])
def test_a_client_without_the_token_gets_a_clear_error_and_the_store_serves_on(
        secured_store: str, monkeypatch: pytest.MonkeyPatch, token: str) -> None:
    monkeypatch.setenv("KVCAKE_CLUSTER_TOKEN", token)
    with pytest.raises(AuthenticationError) as caught:
        asyncio.run(_round_trip(secured_store, {"x": b"y"}))
    assert caught.value.code is ErrorCode.UNAUTHENTICATED
    assert secured_store in str(caught.value) and "cluster token" in str(caught.value)
    monkeypatch.setenv("KVCAKE_CLUSTER_TOKEN", TOKEN)
    assert asyncio.run(_round_trip(secured_store, {"after": b"refusal"})) == {
        "after": b"refusal"}


def test_a_node_without_the_token_cannot_join(secured_store: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVCAKE_CLUSTER_TOKEN", raising=False)
    with pytest.raises(KvcakeError, match="did not start") as caught:
        start_node(secured_store, "4MiB").stop()
    assert "requires the cluster token" in str(caught.value)
