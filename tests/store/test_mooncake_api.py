"""Mooncake's ``MooncakeDistributedStore`` API on kvcake: a real master (a child process, its
lease short), and in-process clients that each contribute a segment, as Mooncake's do."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvcake.common.errors import ErrorCode
from kvcake.ops import ServerProcess, start_master, start_node
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
    both = [store.get_hostname(), other.get_hostname()]
    assert store.put(key, b"d" * 3000, ReplicateConfig(replica_num=2,
                                                       preferred_segments=both)) == 0
    found = store.get_replica_desc(key)
    assert len(found) == 2
    assert all(d.is_memory_replica() and not d.is_disk_replica()
               and not d.is_local_disk_replica() and d.status is ReplicaStatus.COMPLETE
               for d in found)
    buffers = [d.get_memory_descriptor().buffer_descriptor for d in found]
    assert {b.transport_endpoint for b in buffers} == set(both)
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


# ----- setup, Mooncake's ways
def test_setup_names_the_client_by_its_hostname(cluster: Cluster) -> None:
    auto = cluster.client(hostname="localhost")
    host, port = auto.get_hostname().split(":")
    assert host == "localhost" and 12300 <= int(port) <= 14300
    named = cluster.client(hostname="localhost:23456")
    assert named.get_hostname() == "localhost:23456"
    twin = cluster.client(hostname="localhost:23456")  # as in Mooncake, a name, not a port
    key = unique("twins")
    assert named.put(key, b"t" * 512, ReplicateConfig(preferred_segment="localhost:23456")) == 0
    assert twin.get(key) == b"t" * 512
    assert auto.setup("localhost", "p2p", 0, 0, "tcp", "", cluster.endpoint) == \
        ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS  # set up already


@pytest.mark.parametrize(("sizes", "ok"), [
    (("16MB", "16 MB"), True), ((4 << 20, "1.5 mb"), True), (("50%", "16MB"), False),
    (("16MB", "2 TB"), False), (("512", "16MB"), False)])
def test_setup_from_a_dict_with_human_readable_sizes(cluster: Cluster, sizes: tuple[Any, Any],
                                                     ok: bool) -> None:
    store = DistributedStore()
    config = {"local_hostname": "localhost", "metadata_server": "http://unused",
              "global_segment_size": sizes[0], "local_buffer_size": sizes[1],
              "protocol": "tcp", "master_server_addr": cluster.endpoint}
    try:
        code = store.setup(config)
        assert (code == 0) is ok, code
        if ok:
            key = unique("dict")
            assert store.put(key, b"v" * 100) == 0 and store.get(key) == b"v" * 100
    finally:
        store.close()


@pytest.mark.parametrize("bad", [
    {"protocol": "rdma"}, {"local_hostname": "no-such-host.invalid"},
    {"local_hostname": "localhost:99999"}, {"master_server_addr": "127.0.0.1:1"}])
def test_a_setup_that_cannot_work_answers_a_code(cluster: Cluster, bad: dict[str, str]) -> None:
    arguments = {"local_hostname": "localhost", "metadata_server": "p2p",
                 "global_segment_size": 0, "local_buffer_size": 1 << 20, "protocol": "tcp",
                 "rdma_devices": "", "master_server_addr": cluster.endpoint, **bad}
    store = DistributedStore()
    assert store.setup(**arguments) < 0
    assert store.health_check() == 1 and store.close() == 0


def test_setup_keywords_tenant_and_a_shared_engine(cluster: Cluster,
                                                   make_engine: Callable[..., Any]) -> None:
    engine = make_engine(host="127.0.0.1")
    acme = DistributedStore()
    assert acme.setup("localhost", "p2p", 0, 1 << 20, "tcp", "", cluster.endpoint,
                      engine=engine, tenant_id="acme") == 0
    try:
        key = unique("tenant")
        assert acme.put(key, b"acme") == 0
        assert cluster.client().get(key) == b""  # the default tenant sees nothing
        assert acme.get(key) == b"acme" and acme.health_check() == 0
    finally:
        assert acme.close() == 0
    assert engine.endpoint  # still open: it was lent, not owned


# ----- the local buffer (bytes values pass through it)
def test_a_zero_local_buffer_fails_bytes_puts_and_stores_nothing(cluster: Cluster,
                                                                 memory: Memory) -> None:
    store = cluster.client(segment=0, local_buffer=0)
    key = unique("zero")
    assert store.put(key, b"value") == BAD
    assert store.is_exist(key) == 0
    other = memory.store
    assert other.put(key, b"value") == 0
    assert store.get(key) == b"" and store.get_buffer(key) is None  # nowhere to stage it
    assert store.get_size(key) == 5  # metadata needs no buffer


def test_values_larger_than_the_local_buffer_fail_but_zero_copy_does_not(
        cluster: Cluster) -> None:
    store = cluster.client(local_buffer=4096)
    key = unique("big")
    assert store.put(key, b"b" * 4097) == BAD
    assert store.put_batch([key, unique("b2")], [b"1" * 3000, b"2" * 3000]) == BAD
    assert store.put(key, b"b" * 4096) == 0
    array = (ctypes.c_ubyte * 8192)()
    address = ctypes.addressof(array)
    assert store.register_buffer(address, 8192) == 0
    assert store.put_from(unique("big-from"), address, 8192) == 0


# ----- keyword names
def test_keyword_names_are_mooncakes(pair: tuple[DistributedStore, DistributedStore],
                                     memory: Memory) -> None:
    store, _ = pair
    key = unique("kw")
    assert store.put(key=key, value=b"kw", config=ReplicateConfig()) == 0
    assert store.put_batch(keys=[unique("kw1")], values=[b"1"], config=None) == 0
    buf = memory.buffer(b"from")
    assert store.put_from(key=unique("kw2"), buffer_ptr=buf, size=4, config=None) == 0
    assert store.batch_put_from(keys=[unique("kw3")], buffer_ptrs=[buf], sizes=[4]) == [0]
    for wrong in ({"key_arg_name_error": key, "value": b"x"}, {"key": key, "values": b"x"},
                  {"key": key, "value": b"x", "configs": None}):
        with pytest.raises(TypeError):
            store.put(**wrong)


# ----- reads
def test_get_buffer_gives_sized_buffers_or_none(
        pair: tuple[DistributedStore, DistributedStore]) -> None:
    store, other = pair
    keys = [unique("buf1"), unique("buf2")]
    values = [b"first" * 100, b"second" * 300]
    assert store.put_batch(keys, values) == 0
    found = other.batch_get_buffer([keys[0], unique("none"), keys[1]])
    assert found[1] is None
    assert [(b.size(), bytes(b), len(memoryview(b))) for b in (found[0], found[2])
            if b is not None] == [(500, values[0], 500), (1800, values[1], 1800)]
    handle = other.get_buffer(keys[1])
    assert handle is not None and ctypes.string_at(handle.ptr(), 6) == b"second"
    assert other.batch_get_buffer([]) == []


def test_get_into_ranges_reads_buffer_major_and_fails_each_bad_range(
        pair: tuple[DistributedStore, DistributedStore], memory: Memory) -> None:
    store, _ = pair
    key1, key2 = unique("rng1"), unique("rng2")
    data1, data2 = bytes(range(48, 84)), bytes(range(97, 133))
    assert store.put(key1, data1) == 0 and store.put(key2, data2) == 0
    buf0, buf1 = memory.buffer(b"_" * 32), memory.buffer(b"_" * 32)
    results = store.get_into_ranges([buf0, buf1], [[key1, key2], [key2, key1]],
                                    [[[0, 20], [8]], [[4], [16]]],
                                    [[[1, 30], [2]], [[0], [10]]],
                                    [[[4, 3], [5]], [[6], [4]]])
    assert results == [[[4, 3], [5]], [[6], [4]]]
    assert memory.read(buf0, 32) == (data1[1:5] + b"____" + data2[2:7] + b"_" * 7
                                     + data1[30:33] + b"_" * 9)
    assert memory.read(buf1 + 4, 16) == data2[0:6] + b"_" * 6 + data1[10:14]
    assert store.get_into_ranges([buf0], [[key1, key2]], [[[0], []]], [[[0, 1], []]],
                                 [[[], []]]) == [[[BAD], []]]
    assert store.get_into_ranges([buf0], [[key1]], [[[0]]], [[[35]]], [[[4]]]) == [[[BAD]]]
    assert store.get_into_ranges([buf0], [[key1]], [[[31]]], [[[0]]], [[[4]]]) == [[[BAD]]]
    missing = store.get_into_ranges([buf0], [[unique("none"), key1]], [[[0, 4], [8]]],
                                    [[[0, 0], [0]]], [[[4, 4], [4]]])
    assert missing == [[[ErrorCode.OBJECT_NOT_FOUND] * 2, [4]]]
    assert store.get_into_ranges([buf0, buf1], [[key1]], [[[0]]], [[[0]]], [[[4]]]) == \
        [[[BAD]], [[BAD]]]  # lists of another length: everything refused
    unregistered = store.get_into_ranges([1234], [[key1]], [[[0]]], [[[0]]], [[[4]]])
    assert unregistered == [[[BAD]]]


# ----- writes: parts and upserts
def test_put_parts_and_the_upsert_family(pair: tuple[DistributedStore, DistributedStore],
                                         memory: Memory) -> None:
    store, other = pair
    key = unique("parts")
    assert store.put_parts(key, b"ab", bytearray(b"cd"), memoryview(b"ef")) == 0
    assert store.put_parts(key, b"zz") == 0 and other.get(key) == b"abcdef"  # put keeps
    assert store.upsert(key, b"new value, longer") == 0
    assert other.get(key) == b"new value, longer"
    assert store.upsert_parts(key, b"x", b"y") == 0 and other.get(key) == b"xy"
    keys = [unique("ub1"), unique("ub2")]
    assert store.upsert_batch(keys, [b"1", b"22"]) == 0
    assert store.upsert_batch(keys, [b"111", b"2"]) == 0
    assert other.get_batch(keys) == [b"111", b"2"]
    buf = memory.buffer(b"from-buffer")
    assert store.upsert_from(keys[0], buf, 11) == 0 and other.get(keys[0]) == b"from-buffer"
    assert store.batch_upsert_from(keys, [buf, buf + 5], [4, 6]) == [0, 0]
    assert other.get_batch(keys) == [b"from", b"buffer"]


def test_soft_pin_settings_reach_the_master_as_mooncake_checks_them(
        pair: tuple[DistributedStore, DistributedStore]) -> None:
    store, _ = pair
    key = unique("pin")
    enable = ReplicateConfig(soft_pin_action=SoftPinAction.ENABLE, soft_pin_ttl_ms=1000)
    assert store.put(key, b"pinned", enable) == 0
    assert store.upsert(key, b"x", ReplicateConfig(soft_pin_ttl_ms=1000)) == BAD
    disable = ReplicateConfig(soft_pin_action=SoftPinAction.DISABLE, soft_pin_ttl_ms=1000)
    assert store.upsert(key, b"x", disable) == BAD
    assert store.upsert(key, b"y") == 0
    assert store.upsert(key, b"z", ReplicateConfig(soft_pin_action=SoftPinAction.DISABLE)) == 0
    assert store.put(unique("pin2"), b"x", ReplicateConfig(soft_pin_ttl_ms=5)) == BAD
    assert store.put(unique("near"), b"x", ReplicateConfig(prefer_alloc_in_same_node=True)) \
        == BAD  # single-buffer puts refuse it, as Mooncake's


def test_group_ids_travel_per_key(pair: tuple[DistributedStore, DistributedStore],
                                  wait_lease: Callable[[], None]) -> None:
    store, _ = pair
    keys = [unique("grp-a"), unique("grp-b"), unique("solo")]
    grouped = ReplicateConfig(group_ids=["g-test", "g-test", ""])
    assert store.put_batch(keys, [b"a", b"b", b"c"], grouped) == 0
    assert store.put_batch([unique("x")], [b"x"], grouped) == BAD  # one key, three ids
    assert store.get(keys[0]) == b"a"  # leases its whole group
    assert store.batch_remove(keys) == [ErrorCode.OBJECT_HAS_LEASE] * 2 + [0]
    wait_lease()
    assert store.batch_remove(keys) == [0, 0, ErrorCode.OBJECT_NOT_FOUND]


# ----- removal
def test_batch_remove_and_remove_by_regex(pair: tuple[DistributedStore, DistributedStore],
                                          wait_lease: Callable[[], None]) -> None:
    store, _ = pair
    prefix = unique("rx")
    keys = [f"{prefix}-{i}" for i in range(4)]
    assert store.put_batch(keys, [b"v"] * 4) == 0
    assert store.is_exist(keys[3]) == 1  # leased: stays
    assert store.remove_by_regex(rf"^{prefix}-[0-2]$") == 3
    assert store.remove_by_regex(rf"^{prefix}") == 0
    assert store.remove_by_regex("(") == BAD
    assert store.batch_remove([keys[3], keys[0]]) == [ErrorCode.OBJECT_HAS_LEASE,
                                                      ErrorCode.OBJECT_NOT_FOUND]
    assert store.remove_by_regex(rf"^{prefix}", force=True) == 1


def test_batch_replica_clear_drops_own_expired_objects(
        pair: tuple[DistributedStore, DistributedStore],
        wait_lease: Callable[[], None]) -> None:
    store, other = pair
    both, mine, fresh = unique("clr-both"), unique("clr-mine"), unique("clr-fresh")
    two = ReplicateConfig(replica_num=2,
                          preferred_segments=[store.get_hostname(), other.get_hostname()])
    assert store.put(both, b"2" * 64, two) == 0 and store.put(mine, b"m") == 0
    assert other.batch_replica_clear([both, mine]) == []  # not other's objects
    assert store.get(both) == b"2" * 64
    assert store.batch_replica_clear([both, mine, unique("none")]) == [mine]  # both: leased
    wait_lease()
    assert store.put(fresh, b"f") == 0
    assert store.batch_replica_clear([both], segment_name=store.get_hostname()) == [both]
    assert other.get(both) == b"2" * 64  # its other copy serves on
    assert store.batch_replica_clear([fresh], segment_name="nonexistent:1") == []
    assert store.batch_replica_clear([]) == []
    assert store.get(mine) == b"" and store.is_exist(fresh) == 1


# ----- replicas across clients
def test_replicated_puts_survive_the_writer_closing(cluster: Cluster) -> None:
    writer, reader = cluster.client(hostname="localhost:24001"), cluster.client()
    key = unique("repl")
    assert writer.put(key, b"r" * 10_000, ReplicateConfig(replica_num=2)) == 0
    assert writer.close() == 0
    assert reader.get(key) == b"r" * 10_000
    assert writer.setup("localhost:24001", "p2p", SEGMENT, 1 << 20, "tcp", "",
                        cluster.endpoint) == 0
    assert writer.get(key) == b"r" * 10_000


def test_a_client_dropped_without_close_leaves_the_pool(cluster: Cluster) -> None:
    """As Mooncake's client does when its object goes: a kvcake client collected unclosed
    takes its segment out of the pool (with the objects only it held) and ends its threads,
    rather than staying a target for other clients' puts for the life of the process."""
    reader = cluster.client()
    threads = threading.active_count()
    dropped = DistributedStore()
    assert dropped.setup("localhost:24101", "p2p", SEGMENT, 1 << 20, "tcp", "",
                         cluster.endpoint) == 0
    key = unique("dropped")
    assert dropped.put(key, b"d" * 512, ReplicateConfig(preferred_segment="localhost:24101")) == 0
    assert reader.get(key) == b"d" * 512
    del dropped
    assert reader.is_exist(key) == 0 and reader.get(key) == b""
    assert threading.active_count() == threads


# ----- setup_dummy: a process attached to a local kvcake node
def test_setup_dummy_attaches_to_a_node_and_shares_its_name(cluster: Cluster) -> None:
    node = start_node(cluster.endpoint, "8MiB", "--name", "localhost:25001")
    dummy = DistributedStore()
    try:
        assert dummy.setup_dummy(0, 1 << 20, node.endpoints["control"]) == 0
        assert dummy.get_hostname() == "localhost:25001"
        key = unique("dummy")
        assert dummy.put(key, b"d" * 300, ReplicateConfig(preferred_segment="localhost:25001")) \
            == 0
        [desc] = dummy.get_replica_desc(key)
        assert desc.get_memory_descriptor().buffer_descriptor.transport_endpoint == \
            "localhost:25001"
        assert dummy.stats().num_segments >= 1
    finally:
        dummy.close()
        node.stop()
    assert DistributedStore().setup_dummy(0, 1 << 20, "127.0.0.1:1") == ErrorCode.RPC_FAIL


# ----- with a cluster token, pieces of a value stay inside the replica's grant
def test_multi_buffer_pieces_pass_the_nodes_grant_checks(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    token = "mooncake-api-token-" + "k" * 24
    path = tmp_path / "cluster.token"
    path.write_text(token)
    path.chmod(0o600)
    monkeypatch.setenv("KVCAKE_CLUSTER_TOKEN", token)
    monkeypatch.setenv("KVCAKE_TRANSFER_TRANSPORT", "tcp")  # the node checks every frame
    master, endpoint = start_master("--cluster-token-file", str(path))
    node = start_node(endpoint, "4MiB", "--cluster-token-file", str(path))
    store = DistributedStore()
    try:
        assert store.setup("127.0.0.1", "p2p", 0, 1 << 20, "tcp", "", endpoint) == 0
        memory = Memory(store)
        pieces = [b"p" * 1000, b"q" * 3000, b"r" * 17]
        key = unique("granted")
        ptrs = [memory.buffer(p) for p in pieces]
        assert store.batch_put_from_multi_buffers([key], [ptrs], [[1000, 3000, 17]]) == [0]
        outs = [memory.buffer(size=2017), memory.buffer(size=2000)]
        assert store.batch_get_into_multi_buffers([key], [outs], [[2017, 2000]]) == [4017]
        value = b"".join(pieces)
        assert memory.read(outs[0], 2017) + memory.read(outs[1], 2000) == value
        dst = memory.buffer(size=64)
        assert store.get_into_ranges([dst], [[key]], [[[0]]], [[[3990]]], [[[27]]]) == \
            [[[27]]]
        assert memory.read(dst, 27) == value[3990:]
        assert {s.transport for s in store.native._segments.values()} == {"tcp"}
    finally:
        store.close()
        node.stop()
        master.stop()


def test_is_exist_answers_under_the_cpp_clients_name_too(
        pair: tuple[DistributedStore, DistributedStore]) -> None:
    store, key = pair[0], unique("exist")
    assert store.isExist(key) == 0  # Mooncake's store_kv_bench.py calls this name
    assert store.put(key, b"v") == 0
    assert store.isExist(key) == 1 == store.is_exist(key)
