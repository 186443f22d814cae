"""Mooncake's synchronous API runs its calls in the caller's thread: master calls on the
thread's own blocking connection, same-host bytes copied right there. A real master and a
real node (child processes) on loopback."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable

import pytest

from kvcake.common.errors import ErrorCode
from kvcake.ops import ServerProcess, start_master, start_node
from kvcake.store import DistributedStore


def _cluster(servers: list[ServerProcess], *master_args: str) -> str:
    master, endpoint = start_master("--client-ttl", "30", *master_args)
    servers.append(master)
    servers.append(start_node(endpoint, "32MiB"))
    return endpoint


def _client(endpoint: str) -> DistributedStore:
    store = DistributedStore()
    assert store.setup("127.0.0.1", "p2p", 0, 16 << 20, "tcp", "", endpoint) == 0
    return store


def _wait_for(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_calls_never_wait_on_the_engines_loop_for_same_host_replicas(
        servers: list[ServerProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    store = _client(_cluster(servers))
    try:
        engine = store.native.engine
        assert engine is not None

        def refuse(*_: object, **__: object) -> None:
            raise AssertionError("a synchronous call went through the engine's loop")

        monkeypatch.setattr(engine.io, "run", refuse)
        monkeypatch.setattr(engine, "submit", refuse)  # no batch either: copied in place
        source = (ctypes.c_ubyte * 65536).from_buffer_copy(bytes(range(256)) * 256)
        target = (ctypes.c_ubyte * 65536)()
        for buffer in (source, target):
            assert store.register_buffer(ctypes.addressof(buffer), 65536) == 0
        assert store.put_from("k", ctypes.addressof(source), 65536) == 0
        assert store.is_exist("k") == 1 and store.is_exist("absent") == 0
        assert store.get_into("k", ctypes.addressof(target), 65536) == 65536
        assert bytes(target) == bytes(source)
        assert store.put("v", b"value") == 0 and store.get("v") == b"value"
        assert store.batch_get_into(["k", "absent"], [ctypes.addressof(target)] * 2,
                                    [65536] * 2) == [65536, ErrorCode.OBJECT_NOT_FOUND]
        assert store.get_size("k") == 65536 and store.remove("v") in (0, ErrorCode.OBJECT_HAS_LEASE)
    finally:
        monkeypatch.undo()
        store.close()


def test_threads_calling_one_store_at_once_each_read_their_own_writes(
        servers: list[ServerProcess]) -> None:
    store = _client(_cluster(servers))
    failures: list[str] = []

    def work(n: int) -> None:
        for i in range(40):
            key, value = f"t{n}-{i}", f"{n}:{i}".encode() * (1 + i * 50)
            if store.put(key, value) != 0 or store.get(key) != value \
                    or store.is_exist(key) != 1:
                failures.append(key)

    try:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        assert store.batch_is_exist([f"t{n}-39" for n in range(6)]) == [1] * 6
    finally:
        store.close()


def test_a_restarted_master_that_forgot_the_client_is_rejoined_by_the_call_itself(
        servers: list[ServerProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's heartbeat would rejoin only after a minute: the first call after the
    restart finds itself unknown, and is sent again once the session rejoined."""
    endpoint = _cluster(servers)
    monkeypatch.setenv("KVCAKE_STORE_HEARTBEAT_S", "60")
    store = _client(endpoint)
    try:
        assert store.put("before", b"1" * 4096) == 0
        servers[0].kill()
        servers[0] = start_master("--client-ttl", "30", "--port", endpoint.rsplit(":", 1)[1])[0]
        _wait_for(lambda: store.stats().num_segments == 1)  # the node remounted by itself
        assert store.stats().num_clients == 1  # the node only: this client is not known yet
        assert store.put("after", b"3" * 4096) == 0
        assert store.get("after") == b"3" * 4096
        assert store.stats().num_clients == 2
    finally:
        store.close()
