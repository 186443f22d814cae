"""Mooncake's ``MooncakeDistributedStore`` API on kvcake: a real master (a child process, its
lease short), and in-process clients that each contribute a segment, as Mooncake's do."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from kvcake.common.errors import ErrorCode
from kvcake.ops import ServerProcess, start_master
from kvcake.store import DistributedStore, ReplicateConfig, SoftPinAction
from kvcake.store.compat import ReplicaStatus

LEASE_S = 0.5
SEGMENT = 8 << 20
BAD = ErrorCode.INVALID_PARAMS


@dataclass
class Cluster:
    master: ServerProcess
    endpoint: str
    stores: list[DistributedStore]

    def client(self, segment: int = SEGMENT, hostname: str = "127.0.0.1",
               local_buffer: int = 16 << 20) -> DistributedStore:
        store = DistributedStore()
        assert store.setup(hostname, "p2p", segment, local_buffer, "tcp", "", self.endpoint) == 0
        self.stores.append(store)
        return store


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    master, endpoint = start_master("--lease-ttl", str(LEASE_S), "--summary-interval", "0")
    cluster = Cluster(master, endpoint, [])
    try:
        yield cluster
    finally:
        for store in cluster.stores:
            store.close()
        master.stop()


@pytest.fixture(scope="module")
def pair(cluster: Cluster) -> tuple[DistributedStore, DistributedStore]:
    """Two clients, each contributing a segment."""
    return cluster.client(), cluster.client()


class Memory:
    """ctypes buffers registered with a store, by name."""

    def __init__(self, store: DistributedStore) -> None:
        self.store = store
        self.arrays: list[ctypes.Array[ctypes.c_ubyte]] = []

    def buffer(self, data: bytes = b"", size: int = 0) -> int:
        array = (ctypes.c_ubyte * max(size, len(data)))()
        ctypes.memmove(array, data, len(data))
        self.arrays.append(array)
        address = ctypes.addressof(array)
        assert self.store.register_buffer(address, len(array)) == 0
        return address

    @staticmethod
    def read(address: int, size: int) -> bytes:
        return ctypes.string_at(address, size)


@pytest.fixture
def memory(pair: tuple[DistributedStore, DistributedStore]) -> Memory:
    return Memory(pair[0])


def unique(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


# ----- ReplicateConfig
def test_replicate_config_has_mooncakes_attributes_and_kvcakes_names() -> None:
    config = ReplicateConfig()
    assert (config.replica_num, config.soft_pin_action, config.soft_pin_ttl_ms) == \
        (1, SoftPinAction.PRESERVE, None)
    assert (config.with_hard_pin, config.preferred_segment, config.preferred_segments,
            config.prefer_alloc_in_same_node, config.group_ids) == (False, "", [], False, None)
    config.replica_num = 3
    assert "replica_num: 3" in str(config)
    config.soft_pin_ttl_ms = 1500
    assert config.soft_pin_ttl_ms == 1500 and config.soft_pin_ttl_s == 1.5
    for bad in (-1, 1 << 64, 1.5, "10"):
        with pytest.raises(TypeError):
            config.soft_pin_ttl_ms = bad  # type: ignore[assignment]
    assert config.soft_pin_ttl_ms == 1500  # a refused value changes nothing
    with pytest.raises(TypeError):
        config.soft_pin_action = 1  # type: ignore[assignment]
    old = ReplicateConfig(replica_num=2, with_soft_pin=True, soft_pin_ttl_s=2.0)
    assert old.soft_pin_action is SoftPinAction.ENABLE and old.soft_pin_ttl_ms == 2000
    wire = old.to_wire(1)
    assert (wire.replica_num, wire.soft_pinned, wire.soft_pin_ttl_s) == (2, True, 2.0)
    with pytest.raises(TypeError):
        ReplicateConfig(replicas=2)


def test_a_ttl_without_enable_and_groups_of_another_length_are_refused() -> None:
    config = ReplicateConfig(soft_pin_ttl_ms=10)
    with pytest.raises(ValueError, match="ENABLE"):
        config.to_wire(1)
    with pytest.raises(ValueError, match="group_ids"):
        ReplicateConfig(group_ids=["g"]).to_wire(2)


# ----- values over several buffers (vLLM's MooncakeStoreConnector)
def test_multi_buffer_put_and_get_round_trip_byte_exact(
        pair: tuple[DistributedStore, DistributedStore], memory: Memory) -> None:
    store, other = pair
    key_a, key_b = unique("multi-a"), unique("multi-b")
    pieces = {key_a: [b"A" * 1000, b"bb" * 700, b"c" * 3], key_b: [b"Z" * 4096]}
    ptrs = [[memory.buffer(p) for p in ps] for ps in pieces.values()]
    sizes = [[len(p) for p in ps] for ps in pieces.values()]
    assert store.batch_put_from_multi_buffers([key_a, key_b], ptrs, sizes) == [0, 0]
    assert other.get(key_a) == b"".join(pieces[key_a])
    # read back scattered differently: 3 buffers for a 2403-byte value, the last too big
    outs = [memory.buffer(size=1200), memory.buffer(size=1200), memory.buffer(size=100)]
    out_b = memory.buffer(size=4096)
    read = store.batch_get_into_multi_buffers([key_a, key_b], [outs, [out_b]],
                                              [[1200, 1200, 100], [4096]])
    assert read == [2403, 4096]
    whole = b"".join(memory.read(p, n) for p, n in zip(outs, (1200, 1200, 3), strict=True))
    assert whole == b"".join(pieces[key_a])
    assert memory.read(outs[2] + 3, 97) == bytes(97)  # past the value: untouched
    assert memory.read(out_b, 4096) == b"Z" * 4096


def test_multi_buffer_calls_refuse_what_mooncake_refuses(
        pair: tuple[DistributedStore, DistributedStore], memory: Memory) -> None:
    store, _ = pair
    key = unique("multi-bad")
    buf = memory.buffer(b"x" * 64)
    assert store.batch_put_from_multi_buffers([key, "b"], [[buf]], [[64]]) == [BAD, BAD]
    assert store.batch_put_from_multi_buffers([key], [[buf, buf]], [[64]]) == [BAD]
    assert store.batch_put_from_multi_buffers([key], [[12345]], [[8]]) == [BAD]  # unregistered
    two_near = ReplicateConfig(replica_num=2, prefer_alloc_in_same_node=True)
    assert store.batch_put_from_multi_buffers([key], [[buf]], [[64]], two_near) == [BAD]
    assert store.is_exist(key) == 0  # nothing was stored
    assert store.batch_put_from_multi_buffers([], [], []) == []
    assert store.batch_put_from_multi_buffers([key], [[buf, buf]], [[32, 32]]) == [0]
    small = memory.buffer(size=40)
    assert store.batch_get_into_multi_buffers([key], [[small]], [[40]]) == [BAD]
    assert store.batch_get_into_multi_buffers([key, "x"], [[small]], [[40]]) == [BAD, BAD]
    missing = store.batch_get_into_multi_buffers([unique("none")], [[small]], [[40]])
    assert missing == [ErrorCode.OBJECT_NOT_FOUND]


def test_prefer_alloc_in_same_node_places_on_this_hosts_segment(
        pair: tuple[DistributedStore, DistributedStore], memory: Memory) -> None:
    store, _ = pair
    near = ReplicateConfig(prefer_alloc_in_same_node=True)
    keys = [unique(f"near-{i}") for i in range(6)]
    buf = memory.buffer(b"n" * 128)
    assert store.batch_put_from_multi_buffers(keys, [[buf]] * 6, [[128]] * 6, near) == [0] * 6
    segments = {d.get_memory_descriptor().buffer_descriptor.transport_endpoint
                for k in keys for d in store.get_replica_desc(k)}
    assert len(segments) == 1  # every client here is on this host: one (the first) segment


# ----- replica descriptors
def test_replica_descriptors_name_each_copy_and_its_segment(
        pair: tuple[DistributedStore, DistributedStore]) -> None:
    store, other = pair
    key = unique("desc")
    assert store.put(key, b"d" * 3000, ReplicateConfig(replica_num=2)) == 0
    found = store.get_replica_desc(key)
    assert len(found) == 2
    assert all(d.is_memory_replica() and not d.is_disk_replica()
               and not d.is_local_disk_replica() and d.status is ReplicaStatus.COMPLETE
               for d in found)
    buffers = [d.get_memory_descriptor().buffer_descriptor for d in found]
    assert {b.transport_endpoint for b in buffers} == {store.get_hostname(),
                                                      other.get_hostname()}
    assert {b.size for b in buffers} == {3000}
    missing = unique("desc-none")
    assert store.batch_get_replica_desc([key, missing]).keys() == {key}
    assert store.get_replica_desc(missing) == []


def test_a_replica_query_leases_like_a_get(pair: tuple[DistributedStore, DistributedStore],
                                           wait_lease: Callable[[], None]) -> None:
    store, _ = pair
    key = unique("desc-lease")
    assert store.put(key, b"l" * 100) == 0
    assert store.remove(key) == 0  # a put leases nothing
    assert store.put(key, b"l" * 100) == 0
    assert store.get_replica_desc(key)
    assert store.remove(key) == ErrorCode.OBJECT_HAS_LEASE
    wait_lease()
    assert store.remove(key) == 0


@pytest.fixture
def wait_lease() -> Callable[[], None]:
    return lambda: time.sleep(LEASE_S * 1.5)
