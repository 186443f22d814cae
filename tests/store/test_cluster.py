"""A real store in processes: a master, storage nodes and clients on loopback."""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import random
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from waiting import stopped

from kvcake.common.errors import ErrorCode
from kvcake.ops import ServerProcess, start_master, start_node
from kvcake.store import AsyncStore, DistributedStore, ReplicateConfig
from kvcake.store.config import StoreConfig
from kvcake.transfer import TransferEngine
from kvcake.transfer.config import TransferConfig


@pytest.fixture
def cluster() -> Iterator[Callable[..., tuple[ServerProcess, str]]]:
    started: list[ServerProcess] = []

    def master(*args: str) -> tuple[ServerProcess, str]:
        process, endpoint = start_master("--client-ttl", "2", *args)
        started.append(process)
        return process, endpoint

    def node(endpoint: str, size: str = "32MiB", *args: str) -> ServerProcess:
        process = start_node(endpoint, size, *args)
        started.append(process)
        return process

    master.node = node  # type: ignore[attr-defined]
    yield master
    for process in reversed(started):
        process.stop()


@pytest.fixture
def make_store() -> Iterator[Callable[[str], DistributedStore]]:
    stores: list[DistributedStore] = []

    def factory(endpoint: str) -> DistributedStore:
        store = DistributedStore()
        assert store.setup("127.0.0.1", "p2p", 0, 64 << 20, "tcp", "", endpoint) == 0
        stores.append(store)
        return store

    yield factory
    for store in stores:
        store.close()


def _values(seed: int, count: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"obj-{seed}-{i}": rng.randbytes(rng.randrange(1, 3 << 20)) for i in range(count)}


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def _state(pid: int) -> str:
    """The process's scheduler state (``T``: stopped), from ``/proc``."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def _registered(store: DistributedStore, size: int) -> tuple[mmap.mmap, int]:
    buffer = mmap.mmap(-1, size)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    assert store.register_buffer(address, size) == 0
    return buffer, address


def test_two_nodes_two_clients_byte_exact(cluster: Callable[..., tuple[ServerProcess, str]],
                                          make_store: Callable[[str], DistributedStore]) -> None:
    _, endpoint = cluster()
    cluster.node(endpoint), cluster.node(endpoint)  # type: ignore[attr-defined]
    writer, reader = make_store(endpoint), make_store(endpoint)
    values = _values(1, 12)
    config = ReplicateConfig(replica_num=2)
    assert writer.put_batch(list(values), list(values.values()), config) == 0
    for key, value in values.items():
        assert reader.get(key) == value
        assert reader.get_size(key) == len(value)
    buffer, address = _registered(reader, 64 << 20)
    keys, offsets = list(values), []
    position = 0
    for value in values.values():
        offsets.append(position)
        position += len(value)
    sizes = [len(v) for v in values.values()]
    results = reader.batch_get_into(keys, [address + o for o in offsets], sizes)
    assert results == sizes
    for offset, value in zip(offsets, values.values(), strict=True):
        assert buffer[offset : offset + len(value)] == value
    transports = {s.transport for s in reader.native._segments.values()}
    assert transports == {"shm"}  # same host: read through the node's mapping


def test_put_is_insert_if_absent(cluster: Callable[..., tuple[ServerProcess, str]],
                                 make_store: Callable[[str], DistributedStore]) -> None:
    _, endpoint = cluster()
    cluster.node(endpoint)  # type: ignore[attr-defined]
    first, second = make_store(endpoint), make_store(endpoint)
    assert first.put("k", b"first") == 0
    assert second.put("k", b"second!") == 0  # succeeds, writes nothing
    assert second.get("k") == b"first"
    assert first.is_exist("k") == 1 and first.is_exist("nope") == 0


def test_kill_9_of_a_node_keeps_every_object_readable(
        cluster: Callable[..., tuple[ServerProcess, str]],
        make_store: Callable[[str], DistributedStore]) -> None:
    _, endpoint = cluster()
    doomed = cluster.node(endpoint)  # type: ignore[attr-defined]
    cluster.node(endpoint)  # type: ignore[attr-defined]
    store = make_store(endpoint)
    values = _values(2, 10)
    assert store.put_batch(list(values), list(values.values()), ReplicateConfig(replica_num=2)) == 0
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.kill()
    for key, value in values.items():  # before the master notices: the other replica serves
        assert store.get(key) == value
    _wait_for(lambda: store.stats().num_segments == 1)
    for key, value in values.items():
        assert store.get(key) == value
    assert store.put("after", b"x" * 1000) == 0 and store.get("after") == b"x" * 1000


def test_master_restart_clients_and_nodes_rejoin(
        cluster: Callable[..., tuple[ServerProcess, str]],
        make_store: Callable[[str], DistributedStore]) -> None:
    master, endpoint = cluster()
    cluster.node(endpoint), cluster.node(endpoint)  # type: ignore[attr-defined]
    store = make_store(endpoint)
    assert store.put("before", b"1" * 4096) == 0
    master.kill()
    assert store.put("while-down", b"2") == ErrorCode.RPC_FAIL
    cluster("--port", endpoint.rsplit(":", 1)[1])  # same address, empty state
    # both nodes remounted, and this client registered again (2 nodes + 1 client)
    _wait_for(lambda: store.stats().num_segments == 2 and store.stats().num_clients == 3)
    assert store.get("before") == b""  # a restarted master starts empty (HA keeps state)
    assert store.put("after", b"3" * 4096) == 0
    assert store.get("after") == b"3" * 4096


def test_read_outliving_its_lease_fails(cluster: Callable[..., tuple[ServerProcess, str]]) -> None:
    _, endpoint = cluster("--lease-ttl", "0.3")
    node = cluster.node(endpoint)  # type: ignore[attr-defined]

    async def scenario() -> tuple[int, int]:
        # the stalled read is a first one, through the master (a reader that has read "k"
        # before reads it beside the question instead: test_overlapped_reads.py)
        store, reader = (AsyncStore(StoreConfig(master=endpoint),
                                    TransferConfig(transport="tcp")) for _ in range(2))
        await store.setup()
        await reader.setup()
        try:
            await store.put("k", b"v" * 65536)
            fresh = (await store.batch_get_into(["k"], [memoryview(bytearray(65536))]))[0]
            os.kill(node.pid, signal.SIGSTOP)  # the read stalls on the wire past the lease
            _wait_for(lambda: _state(node.pid) in "tT", 5.0)  # stopped before it is asked
            read = asyncio.ensure_future(
                reader.batch_get_into(["k"], [memoryview(bytearray(65536))]))
            await asyncio.sleep(0.8)
            os.kill(node.pid, signal.SIGCONT)
            return fresh, (await read)[0]
        finally:
            await store.close()
            await reader.close()

    fresh, stale = asyncio.run(scenario())
    assert fresh == 65536
    assert stale == ErrorCode.LEASE_EXPIRED


def test_a_same_host_get_is_one_copy_and_reads_count_within_their_lease(
        cluster: Callable[..., tuple[ServerProcess, str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A get of a value on a node of this host copies it once, from the node's memory
    straight into the bytes returned (the transfer engine moves nothing); like any read, one
    that ends after its lease ran out answers LEASE_EXPIRED (its bytes may be stale). Reads
    through the master: this one publishes no location table (a read through the table
    holds no lease, test_table_reads.py)."""
    # a lease long beside a fresh read, even on a busy host
    _, endpoint = cluster("--lease-ttl", "1", "--location-slots", "0")
    cluster.node(endpoint)  # type: ignore[attr-defined]
    size = 65536

    async def read(store: AsyncStore) -> tuple[bytes | int, int]:
        return ((await store.get_batch(["k"]))[0],
                (await store.batch_get_into(["k"], [memoryview(bytearray(size))]))[0])

    def stalled(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            time.sleep(1.2)  # the copy starts after the 1 s lease
            return real(*args)
        return call

    async def scenario() -> tuple[bytes | int, int, tuple[bytes | int, int]]:
        store = AsyncStore(StoreConfig(master=endpoint))
        await store.setup()
        try:
            await store.attach_segments()
            await store.put("k", b"v" * size)
            with monkeypatch.context() as patch:
                patch.setattr(TransferEngine, "copy", _refused)
                got = (await store.get_batch(["k"]))[0]
            read_into = (await store.batch_get_into(["k"], [memoryview(bytearray(size))]))[0]
            for name in ("map_range", "copy"):  # get reads through the first, get_into the other
                monkeypatch.setattr(TransferEngine, name, stalled(getattr(TransferEngine, name)))
            return got, read_into, await read(store)
        finally:
            monkeypatch.undo()
            await store.close()

    got, read_into, stale = asyncio.run(scenario())
    assert (got, read_into) == (b"v" * size, size)
    assert stale == (ErrorCode.LEASE_EXPIRED, ErrorCode.LEASE_EXPIRED)


def _refused(*_: Any) -> Any:
    raise AssertionError("a same-host get went through the transfer engine")


def test_values_read_in_place_are_the_replicas_own_bytes(
        cluster: Callable[..., tuple[ServerProcess, str]]) -> None:
    """Same-host replicas come as views of the node's mapping (no copy), fresh while their
    leases hold and their owner lives; over tcp only, none is offered."""
    _, endpoint = cluster("--lease-ttl", "0.3")
    node = cluster.node(endpoint)  # type: ignore[attr-defined]

    async def scenario() -> None:
        local, remote = (AsyncStore(StoreConfig(master=endpoint), TransferConfig(transport=t))
                         for t in ("auto", "tcp"))
        await local.setup()
        await remote.setup()
        try:
            await local.attach_segments()  # the node's segment mapped before any transfer
            assert "shm" in {segment.transport for segment in local._segments.values()}
            await local.put("k", b"v" * 65536)
            found = await local.batch_get_in_place(["k", "missing"])
            assert found.codes == [0, ErrorCode.OBJECT_NOT_FOUND] and found.ranges[1] is None
            assert found.ranges[0] is not None and bytes(found.ranges[0].view) == b"v" * 65536
            assert found.fresh()
            await asyncio.sleep(0.4)
            assert not found.fresh()  # the lease ran out: what was read may be stale
            assert (await remote.batch_get_in_place(["k"])).ranges == [None]
            again = await local.batch_get_in_place(["k"])
            node.kill()
            assert not again.fresh()  # the owner is gone
        finally:
            await local.close()
            await remote.close()

    asyncio.run(scenario())


def test_disk_tier_offloads_and_promotes(cluster: Callable[..., tuple[ServerProcess, str]],
                                         make_store: Callable[[str], DistributedStore],
                                         tmp_path: os.PathLike[str]) -> None:
    _, endpoint = cluster("--lease-ttl", "0.2")
    cluster.node(endpoint, "4MiB", "--disk-dir", str(tmp_path),  # type: ignore[attr-defined]
                 "--disk-capacity", "64MiB")
    store = make_store(endpoint)
    rng = random.Random(3)
    values = {f"d{i}": rng.randbytes(512 * 1024) for i in range(16)}  # 8 MiB into 4 MiB
    for key, value in values.items():
        assert store.put(key, value) == 0  # a full memory waits for its offloads
    assert any(path.suffix == ".kv" for path in Path(tmp_path).iterdir())
    time.sleep(0.5)  # leases of the puts' reads run out
    for key, value in values.items():
        assert store.get(key) == value, key
    stats = store.stats()
    assert stats.offloaded > 0 and stats.promoted > 0


def test_keys_read_beside_a_promotion_stay_leased_through_its_wait(
        cluster: Callable[..., tuple[ServerProcess, str]],
        make_store: Callable[[str], DistributedStore], tmp_path: os.PathLike[str]) -> None:
    """A batch get of a key in memory and one only on disk waits for the promotion; held up
    longer than a lease (its node stopped), the reply still leases the first key from its
    own time: right after it, that key cannot be removed."""
    _, endpoint = cluster("--lease-ttl", "3", "--client-ttl", "60")  # the node outlives its stop
    node = cluster.node(endpoint, "4MiB", "--disk-dir", str(tmp_path),  # type: ignore[attr-defined]
                        "--disk-capacity", "64MiB")
    store = make_store(endpoint)
    values = {f"d{i}": bytes([i]) * (512 * 1024) for i in range(12)}  # 6 MiB into 4 MiB
    for key, value in values.items():
        assert store.put(key, value) == 0  # d0 first out: on disk only
    _wait_for(lambda: store.stats().offloaded > 0)
    got: list[list[bytes]] = []
    with stopped(node):  # the promotion waits for the node
        _wait_for(lambda: _state(node.pid) in "tT", 5.0)
        reader = threading.Thread(target=lambda: got.append(store.get_batch(["d11", "d0"])))
        reader.start()
        time.sleep(4.0)  # longer than the lease d11 got when the get came in
    reader.join(15.0)
    assert got == [[values["d11"], values["d0"]]]
    assert store.remove("d11") == ErrorCode.OBJECT_HAS_LEASE  # leased again as answered


def test_a_full_disk_tier_keeps_the_newest_evictions(
        cluster: Callable[..., tuple[ServerProcess, str]],
        make_store: Callable[[str], DistributedStore], tmp_path: os.PathLike[str]) -> None:
    """24 values of 512 KiB through 4 MiB of memory and 4 MiB of disk: the disk drops its
    oldest copies for newer evictions (a full disk used to keep the first ones and delete
    every later eviction), never holds more than its capacity, and what it holds comes back."""
    _, endpoint = cluster("--lease-ttl", "0.2")
    cluster.node(endpoint, "4MiB", "--disk-dir", str(tmp_path),  # type: ignore[attr-defined]
                 "--disk-capacity", "4MiB")
    store = make_store(endpoint)
    rng = random.Random(5)
    values = {f"d{i:02d}": rng.randbytes(512 * 1024) for i in range(24)}
    for key, value in values.items():
        assert store.put(key, value) == 0  # a full memory waits for its offloads
    present = [key for key in values if store.is_exist(key) == 1]
    assert "d00" not in present and "d01" not in present and len(present) > 8, present
    stats = store.stats()
    assert stats.disk_evicted > 0 and stats.disk_used_bytes <= 4 << 20
    time.sleep(0.3)  # the exists' leases run out
    assert store.get(present[0]) == values[present[0]]  # promoted from disk


def test_metrics_endpoint(cluster: Callable[..., tuple[ServerProcess, str]],
                          make_store: Callable[[str], DistributedStore]) -> None:
    master, endpoint = cluster("--arena-size", "0")  # a put asks: PutStart is counted
    cluster.node(endpoint)  # type: ignore[attr-defined]
    store = make_store(endpoint)
    assert store.put("m", b"x" * 100) == 0
    text = _metrics(master)
    assert "kvcake_store_keys 1" in text
    assert 'kvcake_store_requests_total{op="PutStart"} 1' in text


def _metrics(master: ServerProcess) -> str:
    metrics_at = master.output().split("metrics http://", 1)[1].split(")", 1)[0]
    with urllib.request.urlopen(f"http://{metrics_at}", timeout=5) as response:
        text: str = response.read().decode()
    return text


def test_clients_beat_often_enough_for_the_masters_ttl(
        cluster: Callable[..., tuple[ServerProcess, str]]) -> None:
    """A client configured to beat every 5 s, with a master that declares a client dead
    after 2 s of silence, beats at a quarter of the TTL the master announces: past several
    TTLs it was never declared dead."""
    master, endpoint = cluster()  # --client-ttl 2
    cluster.node(endpoint)  # type: ignore[attr-defined]

    async def scenario() -> None:
        store = AsyncStore(StoreConfig(master=endpoint, heartbeat_s=5.0))
        await store.setup()
        try:
            assert store.session is not None and store.session.beat_period() == 0.5
            for i in range(3):
                await store.put(f"k{i}", b"v" * 100)
                await asyncio.sleep(2.5)  # past the TTL: a client silent this long is dead
        finally:
            await store.close()

    asyncio.run(scenario())
    assert "kvcake_store_dead_clients_total 0" in _metrics(master)


def test_a_master_that_stood_still_declares_no_live_client_dead(
        cluster: Callable[..., tuple[ServerProcess, str]]) -> None:
    """A master stopped for longer than its client TTL finds, once it runs again, the
    heartbeats its clients sent meanwhile before it judges their silence."""
    master, endpoint = cluster()  # --client-ttl 2
    cluster.node(endpoint)  # type: ignore[attr-defined]
    store = AsyncStore(StoreConfig(master=endpoint))

    async def scenario() -> None:
        await store.setup()
        try:
            await store.put("k", b"v" * 100)
            os.kill(master.pid, signal.SIGSTOP)
            try:
                _wait_for(lambda: _state(master.pid) in "tT", 5.0)
                await asyncio.sleep(3.0)  # the node and the client beat into its sockets
            finally:
                os.kill(master.pid, signal.SIGCONT)
            assert (await store.get_batch(["k"]))[0] == b"v" * 100
        finally:
            await store.close()

    asyncio.run(scenario())
    assert "kvcake_store_dead_clients_total 0" in _metrics(master)


def test_bad_input_gets_clear_codes(cluster: Callable[..., tuple[ServerProcess, str]],
                                    make_store: Callable[[str], DistributedStore]) -> None:
    _, endpoint = cluster()
    cluster.node(endpoint, "8MiB")  # type: ignore[attr-defined]
    store = make_store(endpoint)
    assert store.put("keep", b"safe") == 0
    assert store.put("", b"x") == ErrorCode.INVALID_KEY
    assert store.put("k" * 5000, b"x") == ErrorCode.INVALID_KEY
    assert store.put("empty", b"") == ErrorCode.INVALID_PARAMS
    assert store.put("huge", bytes(9 << 20)) == ErrorCode.INVALID_PARAMS
    assert store.get_into("keep", 12345, 4) == ErrorCode.INVALID_PARAMS  # not registered
    _, address = _registered(store, 4096)
    assert store.get_into("keep", address, 2) == ErrorCode.INVALID_PARAMS  # as Mooncake
    assert store.get_into("missing", address, 4) == ErrorCode.OBJECT_NOT_FOUND
    assert store.get("keep") == b"safe"  # nothing stored was lost


def test_master_down_is_a_clear_error() -> None:
    store = DistributedStore()
    assert store.setup("127.0.0.1", "p2p", 0, 0, "tcp", "", "127.0.0.1:1") == ErrorCode.RPC_FAIL
    assert store.get("k") == b""
    assert store.put("k", b"v") == ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS


def test_tensors_round_trip(cluster: Callable[..., tuple[ServerProcess, str]],
                            make_store: Callable[[str], DistributedStore]) -> None:
    torch = pytest.importorskip("torch")
    _, endpoint = cluster()
    cluster.node(endpoint)  # type: ignore[attr-defined]
    store = make_store(endpoint)
    tensor = torch.arange(24, dtype=torch.bfloat16).reshape(2, 3, 4)
    assert store.put_tensor("t", tensor) == 0
    back = store.get_tensor("t")
    assert back.dtype == torch.bfloat16 and back.shape == (2, 3, 4)
    assert torch.equal(back, tensor)
    assert store.get_tensor("absent") is None
