"""Same-host puts through arenas (:mod:`kvcake.store.commits`): a real master and node
(child processes) and Mooncake-API clients in this process. A put returns without the
master, and every later call of any client finds it."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable

import pytest
from waiting import answered_within, stopped, wait_for

from kvcake.common import codec
from kvcake.common.blocking_rpc import BlockingRpcClient
from kvcake.common.errors import ErrorCode
from kvcake.ops import ServerProcess, start_master, start_node
from kvcake.store import AsyncStore, DistributedStore
from kvcake.store.config import StoreConfig
from kvcake.wire import store as m


def _cluster(servers: list[ServerProcess], *master_args: str, node: str = "64MiB") -> str:
    master, endpoint = start_master("--client-ttl", "30", *master_args)
    servers.append(master)
    servers.append(start_node(endpoint, node))
    return endpoint


def _consistent(endpoint: str) -> bool:
    """The master's own checks: allocations, objects and arenas agree."""
    client = BlockingRpcClient(endpoint, 5.0)
    try:
        return codec.decode(client.call(codec.encode(m.CheckIntegrity())), m.IntegrityReply).ok
    finally:
        client.close()


def _value(key: str, size: int) -> bytes:
    return (key.encode() * (size // len(key) + 1))[:size]


def test_a_put_returns_while_the_master_is_stopped_and_every_client_then_finds_it(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore]) -> None:
    endpoint = _cluster(servers)
    writer, reader = clients(endpoint), clients(endpoint)
    assert writer.put("first", b"asks for the arena") == 0
    with stopped(servers[0]):
        for i in range(20):
            assert answered_within(lambda i=i: writer.put(f"k{i}", _value(f"k{i}", 70_000)),
                                   5.0) == 0
    assert [reader.is_exist(f"k{i}") for i in range(20)] == [1] * 20
    assert all(reader.get(f"k{i}") == _value(f"k{i}", 70_000) for i in range(20))
    assert writer.get("k3") == _value("k3", 70_000)
    assert writer.remove("k19", force=True) == 0 and reader.is_exist("k19") == 0


def test_the_asyncio_api_puts_through_its_arena_too(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore]) -> None:
    endpoint = _cluster(servers)

    async def puts() -> None:
        store = AsyncStore(StoreConfig(master=endpoint))
        await store.setup()
        try:
            await store.put("first", b"asks for the arena")
            with stopped(servers[0]):
                await asyncio.wait_for(store.batch_put_from(
                    ["a", "b"], [memoryview(b"a" * 5000), memoryview(b"b" * 9000)]), 5.0)
        finally:
            await store.close()

    asyncio.run(puts())
    reader = clients(endpoint)
    assert (reader.get("a"), reader.get("b")) == (b"a" * 5000, b"b" * 9000)
    assert reader.stats().arena_bytes == 0  # the closed client gave its arena back


def test_a_put_of_a_key_that_exists_keeps_the_first_value(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore]) -> None:
    endpoint = _cluster(servers)
    first, second = clients(endpoint), clients(endpoint)
    assert first.put("k", b"first") == 0
    assert second.put("k", b"second") == 0  # as Mooncake: the key is there, nothing to write
    assert first.get("k") == b"first" and second.get("k") == b"first"
    assert second.upsert("k", b"replaced") == 0 and first.get("k") == b"replaced"


def test_threads_of_one_client_crossing_arenas_each_read_their_own_values(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore]) -> None:
    """Four threads put values of several sizes through one client's arenas of 256 KiB,
    so arenas fill and are replaced while other threads write; batches too."""
    endpoint = _cluster(servers, "--arena-size", "256KiB")
    store, reader = clients(endpoint), clients(endpoint)
    errors: list[str] = []

    def work(thread: int) -> None:
        for i in range(60):
            key = f"t{thread}-{i}"
            if i % 10 == 9:
                keys = [f"{key}-{j}" for j in range(4)]
                codes = store.put_batch(keys, [_value(k, 3000 + j) for j, k in enumerate(keys)])
                if codes != 0:
                    errors.append(f"{key}: batch {codes}")
            elif (code := store.put(key, _value(key, 1000 + 977 * i))) != 0:
                errors.append(f"{key}: {code}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    for t in range(4):
        for i in range(60):
            key = f"t{t}-{i}"
            if i % 10 == 9:
                assert reader.batch_get_buffer([f"{key}-{j}" for j in range(4)]) is not None
                assert [reader.get(f"{key}-{j}") for j in range(4)] == \
                    [_value(f"{key}-{j}", 3000 + j) for j in range(4)]
            else:
                assert reader.get(key) == _value(key, 1000 + 977 * i), key
    assert _consistent(endpoint)


def test_a_client_crossing_many_arenas_keeps_no_ring_open_it_left(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore]) -> None:
    store = clients(_cluster(servers, "--arena-size", "64KiB"))  # four 16 KiB values each
    assert store.put("first", b"x") == 0
    open_before = len(os.listdir("/proc/self/fd"))
    for i in range(200):  # 50 arenas
        assert store.put(f"k{i}", _value(f"k{i}", 16 << 10)) == 0
    assert len(os.listdir("/proc/self/fd")) <= open_before
    assert store.get("k199") == _value("k199", 16 << 10)


def test_puts_too_large_or_with_bad_keys_still_get_their_codes(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore]) -> None:
    store = clients(_cluster(servers, "--arena-size", "256KiB", node="8MiB"))
    assert store.put("keep", b"safe") == 0
    assert store.put("", b"x") == ErrorCode.INVALID_KEY
    assert store.put("k" * 5000, b"x") == ErrorCode.INVALID_KEY
    assert store.put("big", os.urandom(1 << 20)) == 0  # past a quarter arena: asks
    assert store.put("huge", bytes(9 << 20)) == ErrorCode.INVALID_PARAMS
    assert store.get("keep") == b"safe" and len(store.get("big")) == 1 << 20


def test_keys_no_message_can_carry_are_refused_by_name_and_a_batch_with_one_stores_nothing(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore]) -> None:
    """A lone surrogate is not UTF-8, and a key that is not text is no key: every call
    answers ``INVALID_KEY`` instead of raising, and a batch that holds one stores none of
    its keys (the arena took the valid ones before)."""
    endpoint = _cluster(servers)
    store = clients(endpoint)
    assert store.put("keep", b"safe") == 0
    for bad in ("\ud800", "a\udfffb", 7, b"bytes"):
        assert store.put(bad, b"x") == ErrorCode.INVALID_KEY  # type: ignore[arg-type]
        assert store.get(bad) == b""  # type: ignore[arg-type]
        assert store.is_exist(bad) == ErrorCode.INVALID_KEY  # type: ignore[arg-type]
        assert store.remove(bad) == ErrorCode.INVALID_KEY  # type: ignore[arg-type]
        assert store.put_batch(["fine", bad], [b"a", b"b"]) == ErrorCode.INVALID_KEY
        assert store.is_exist("fine") == 0
    assert store.get("keep") == b"safe" and _consistent(endpoint)
    tenant = clients(endpoint, tenant_id="acme")  # its keys are scoped: "7" must not be 7's
    assert tenant.put("7", b"seven") == 0 and tenant.is_exist("7") == 1
    assert tenant.is_exist(7) == ErrorCode.INVALID_KEY  # type: ignore[arg-type]
    assert tenant.get(7) == b"" and tenant.batch_is_exist(["7", 7]) == [  # type: ignore[list-item]
        ErrorCode.INVALID_KEY] * 2


def test_a_killed_node_ends_its_arena_and_puts_are_refused_not_lost(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore]) -> None:
    store = clients(_cluster(servers))
    assert store.put("before", b"x" * 100) == 0
    servers[1].kill()
    assert store.put("after", b"y" * 100) == ErrorCode.INVALID_PARAMS  # no segment left
    assert store.is_exist("after") == 0


def test_after_a_master_restart_puts_go_to_the_new_master(
        servers: list[ServerProcess], clients: Callable[..., DistributedStore],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The old master's arena lies in memory the new master may give to anyone: it is
    never written again."""
    endpoint = _cluster(servers)
    monkeypatch.setenv("KVCAKE_STORE_HEARTBEAT_S", "60")  # the call itself must notice
    store, other = clients(endpoint), clients(endpoint)
    assert store.put("old", b"old" * 1000) == 0
    servers[0].kill()
    servers[0] = start_master("--client-ttl", "30", "--port", endpoint.rsplit(":", 1)[1])[0]
    wait_for(lambda: other.stats().num_segments == 1)  # the node remounted by itself
    assert other.put("theirs", b"t" * 50_000) == 0
    assert store.put("new", b"new" * 1000) == 0
    assert store.get("new") == b"new" * 1000 and other.get("theirs") == b"t" * 50_000
    assert store.get("old") == b"" and _consistent(endpoint)
