"""Tenants of the store: namespaces, quotas, fair eviction and tokens, driven through a
MasterService with a fake clock (exact keys, eviction order and usage), then once over real
processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvcake.cli import build_parser
from kvcake.cli_flags import tenant_overrides
from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError, PermissionDeniedError
from kvcake.ops import ServerProcess, start_master, start_node
from kvcake.store import DistributedStore
from kvcake.store.config import StoreConfig
from kvcake.store.master.config import MasterConfig, TenantPolicy
from kvcake.store.master.metrics import render_metrics
from kvcake.store.master.service import MasterService
from kvcake.store.master.tenants import (
    load_tenants,
    merge_tenants,
    parse_tenant_quota,
    scoped_key,
    tenant_of_key,
    user_key,
)
from kvcake.store.master.tiering import OffloadTask, PromoteTask
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire.store import ReplicaHandle, ReplicateConfig, TenantStats

KIB = 1 << 10
OBJ = 4 * KIB  # 16 objects fill a 64 KiB segment
SEGMENT = 64 * KIB
A, B = "\x1fa/", "\x1fb/"  # object key prefixes of tenants a and b


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_service(*tenants: TenantPolicy, **fields: Any) -> tuple[MasterService, FakeClock]:
    fields.setdefault("seed", 1)
    clock = FakeClock()
    return MasterService(MasterConfig(tenants=tenants, **fields), clock), clock


def descriptor(name: str, size: int = SEGMENT) -> SegmentDescriptor:
    return SegmentDescriptor(name=name, segment_id=0, size=size, host_id=f"host-{name}",
                             endpoint="127.0.0.1:1", shm_socket="", shm_inode=0)


def mount(service: MasterService, name: str, size: int = SEGMENT, **kwargs: Any) -> int:
    service.register_client(f"node-{name}", f"host-{name}")
    return service.mount_segment(f"node-{name}", descriptor(name, size), **kwargs)


def join(service: MasterService, *tenants: str) -> None:
    """One client per tenant, named after it."""
    for tenant in tenants:
        service.register_client(tenant, f"host-{tenant}", tenant)


def put(service: MasterService, client_id: str, key: str, size: int = OBJ,
        **config: Any) -> list[ReplicaHandle]:
    handles = service.put_start(client_id, key, size, ReplicateConfig(**config))
    assert isinstance(handles, list), handles
    assert service.put_end(client_id, key) is ErrorCode.OK
    return handles


def objects(service: MasterService) -> list[str]:
    return sorted(service.objects)


# ----- keys
def test_object_keys_map_one_to_one() -> None:
    assert scoped_key("default", "k") == "k"
    assert scoped_key("a", "x/y") == "\x1fa/x/y"
    for tenant, key in (("default", "a/b"), ("a", "b"), ("a.b-c_1", "/k/")):
        assert (tenant_of_key(scoped_key(tenant, key)), user_key(scoped_key(tenant, key))) == (
            tenant, key)


# ----- isolation
def test_the_same_key_of_two_tenants_is_two_objects() -> None:
    service, _ = make_service()
    seg = mount(service, "seg0")
    join(service, "a", "b")
    assert put(service, "a", "k", 100) == [ReplicaHandle(seg, 0)]
    assert put(service, "b", "k", 200) == [ReplicaHandle(seg, 128)]  # not ALREADY_EXISTS
    assert objects(service) == [A + "k", B + "k"]
    assert service.get_replicas("k", "a") == (100, [ReplicaHandle(seg, 0)])
    assert service.get_replicas("k", "b") == (200, [ReplicaHandle(seg, 128)])
    assert service.get_replicas("k") is ErrorCode.OBJECT_NOT_FOUND  # the default tenant's
    assert not service.exist("k")
    service.check_integrity()


def test_no_operation_of_one_tenant_touches_another_tenants_objects() -> None:
    service, clock = make_service()
    mount(service, "seg0")
    join(service, "a", "b")
    put(service, "a", "k")
    put(service, "a", "only-a")
    assert service.exist("k", "a") and not service.exist("k", "b")
    assert service.get_replicas("only-a", "b") is ErrorCode.OBJECT_NOT_FOUND
    assert service.remove("k", tenant="b") is ErrorCode.OBJECT_NOT_FOUND
    assert service.remove("k", force=True, tenant="b") is ErrorCode.OBJECT_NOT_FOUND
    assert service.put_end("b", "k") is ErrorCode.OBJECT_NOT_FOUND  # b has no put of k
    assert service.put_revoke("b", "k") is ErrorCode.OBJECT_NOT_FOUND
    put(service, "b", "k")
    put(service, "b", "only-b")
    clock.now = 10.0  # past every lease the reads above granted
    assert service.remove_all(tenant="b") == 2
    assert objects(service) == [A + "k", A + "only-a"]
    assert service.remove_all(force=True) == 0  # the default tenant has nothing
    assert service.remove("k", tenant="a") is ErrorCode.OK
    assert objects(service) == [A + "only-a"]
    service.check_integrity()


def test_keys_in_the_tenant_marker_form_are_refused() -> None:
    service, _ = make_service()
    mount(service, "seg0")
    join(service, "a")
    put(service, "a", "k")
    service.register_client("plain", "host-plain")
    with pytest.raises(InvalidParamsError) as info:
        service.get_replicas(A + "k")  # the default tenant naming a's object key
    assert info.value.code is ErrorCode.INVALID_KEY
    with pytest.raises(InvalidParamsError):
        service.put_start("plain", A + "k", OBJ, ReplicateConfig())
    with pytest.raises(InvalidParamsError):
        service.remove(A + "k", force=True)
    assert objects(service) == [A + "k"]


def test_calls_act_in_the_registered_tenant() -> None:
    service, _ = make_service()
    join(service, "a")
    assert service.tenant_of("a") == "a"
    assert service.tenant_of("") == "default"  # a bare read, as before tenants existed
    with pytest.raises(KvcakeError) as info:
        service.tenant_of("ghost")
    assert info.value.code is ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS
    with pytest.raises(PermissionDeniedError):
        service.register_client("a", "host-a", "b")  # a client never changes tenant
    service.register_client("a", "host-a", "a")  # re-registering as itself is fine
    service.registry.clients["a"].tenant = ""  # as a journal restores it
    with pytest.raises(KvcakeError) as info:
        service.tenant_of("a")
    assert info.value.code is ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS  # register again
    service.register_client("a", "host-a", "a")
    assert service.tenant_of("a") == "a"


# ----- tokens
def test_a_tenant_with_a_token_admits_only_clients_that_present_it() -> None:
    service, _ = make_service(TenantPolicy("a", token="s3cret-a"),
                              TenantPolicy("default", token="s3cret-d"))
    with pytest.raises(PermissionDeniedError, match="needs a token") as info:
        service.register_client("c1", "h", "a")
    assert info.value.code is ErrorCode.ILLEGAL_CLIENT and info.value.status == 403
    with pytest.raises(PermissionDeniedError, match="wrong token") as info:
        service.register_client("c1", "h", "a", "s3cret-b")
    assert "s3cret" not in str(info.value)
    service.register_client("c1", "h", "a", "s3cret-a")
    service.register_client("c2", "h", "b", "anything")  # b has no token: self-declared
    assert sorted(service.registry.clients) == ["c1", "c2"]
    with pytest.raises(PermissionDeniedError):
        service.tenant_of("")  # no bare reads of a tenant that has a token


def test_a_bad_tenant_name_is_refused() -> None:
    service, _ = make_service()
    for bad in ("", "a/b", "-a", "a b", "x" * 65, "a\n"):
        with pytest.raises(InvalidParamsError, match="tenant must be"):
            service.register_client("c", "h", bad)
    with pytest.raises(InvalidParamsError):
        StoreConfig(tenant="a/b")
    with pytest.raises(InvalidParamsError, match="more than once"):
        MasterConfig(tenants=(TenantPolicy("a"), TenantPolicy("a", 1)))
    with pytest.raises(InvalidParamsError, match="TenantPolicy"):
        MasterConfig(tenants="a=1GiB")  # type: ignore[arg-type]


# ----- quotas
def quota_service(**fields: Any) -> tuple[MasterService, FakeClock, int]:
    """Tenant a may hold 4 objects; b is unlimited; b's 4 objects are the oldest."""
    service, clock = make_service(TenantPolicy("a", 4 * OBJ), **fields)
    seg = mount(service, "seg0")
    join(service, "a", "b")
    for i in range(4):
        put(service, "b", f"b{i}")
    for i in range(4):
        put(service, "a", f"a{i}")
    return service, clock, seg


def test_a_put_past_its_quota_evicts_the_tenants_own_least_recently_used() -> None:
    service, clock, seg = quota_service()
    assert isinstance(service.get_replicas("a0", "a"), tuple)  # a0 becomes the most recent
    clock.now = 10.0  # its lease is over
    assert put(service, "a", "a4") == [ReplicaHandle(seg, 5 * OBJ)]  # a1's block
    assert objects(service) == [A + "a0", A + "a2", A + "a3", A + "a4",
                                "\x1fb/b0", "\x1fb/b1", "\x1fb/b2", "\x1fb/b3"]
    put(service, "a", "a5")
    assert objects(service)[:4] == [A + "a0", A + "a3", A + "a4", A + "a5"]
    assert service.tenants.used == {"a": 4 * OBJ, "b": 4 * OBJ}
    assert service.tenants.evicted == {"a": 2}
    service.check_integrity()


def test_a_tenant_at_its_quota_looks_only_at_its_own_objects(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each put past the quota evicts the tenant's oldest object, found in the tenant's own
    order: the objects other tenants stored before it are not walked for every put."""
    service, _ = make_service(TenantPolicy("a", 4 * OBJ))
    mount(service, "seg0", size=1024 * OBJ)
    join(service, "a", "b")
    for i in range(300):
        put(service, "b", f"b{i}")
    for i in range(4):
        put(service, "a", f"a{i}")
    looked: list[str] = []
    group_of = service.table.group_of
    monkeypatch.setattr(service.table, "group_of",
                        lambda obj: looked.append(obj.key) or group_of(obj))
    for i in range(4, 14):
        put(service, "a", f"a{i}")
    assert [k for k in objects(service) if k.startswith(A)] == [
        A + f"a{i}" for i in range(10, 14)]
    assert looked and all(key.startswith(A) for key in looked)  # none of b's 300
    service.check_integrity()


def test_soft_pinned_objects_of_the_tenant_go_last() -> None:
    service, _ = make_service(TenantPolicy("a", 3 * OBJ))
    mount(service, "seg0")
    join(service, "a")
    put(service, "a", "pinned", with_soft_pin=True, soft_pin_ttl_s=100.0)
    put(service, "a", "x")
    put(service, "a", "y")
    put(service, "a", "z")  # evicts x, not the older pinned one
    assert objects(service) == [A + "pinned", A + "y", A + "z"]
    assert service.exist("y", "a") and service.exist("z", "a")  # leased until 5 s
    put(service, "a", "w")  # only the pinned one is evictable now
    assert objects(service) == [A + "w", A + "y", A + "z"]
    service.check_integrity()


def test_at_quota_with_nothing_evictable_a_put_gets_no_available_handle() -> None:
    service, clock, _ = quota_service()
    for i in range(4):
        assert service.exist(f"a{i}", "a")  # leased: not evictable
    before = objects(service)
    assert service.put_start("a", "a4", OBJ, ReplicateConfig()) is ErrorCode.NO_AVAILABLE_HANDLE
    assert objects(service) == before  # nothing evicted, b's objects untouched
    clock.now = 10.0
    too_big = service.put_start("a", "huge", 5 * OBJ, ReplicateConfig())
    assert too_big is ErrorCode.NO_AVAILABLE_HANDLE  # more than the whole quota
    assert objects(service) == before  # and no object was evicted in vain
    assert service.tenants.evicted == {}
    assert isinstance(service.put_start("b", "b4", 4 * OBJ, ReplicateConfig()), list)
    service.check_integrity()


def test_a_quota_counts_every_replica() -> None:
    service, _ = make_service(TenantPolicy("a", 4 * OBJ))
    mount(service, "seg0")
    mount(service, "seg1")
    join(service, "a")
    put(service, "a", "a0", replica_num=2)
    put(service, "a", "a1", replica_num=2)
    assert service.tenants.used == {"a": 4 * OBJ}
    put(service, "a", "a2", replica_num=2)  # frees both replicas of a0
    assert objects(service) == [A + "a1", A + "a2"]
    assert service.tenants.used == {"a": 4 * OBJ}
    service.check_integrity()


def test_the_default_tenant_quota_covers_unnamed_tenants() -> None:
    service, _ = make_service(TenantPolicy("big", 0),  # 0: unlimited
                              default_tenant_quota_bytes=2 * OBJ)
    mount(service, "seg0")
    join(service, "big", "c")
    for i in range(3):
        put(service, "c", f"c{i}")
        put(service, "big", f"g{i}")
    assert objects(service) == ["\x1fbig/g0", "\x1fbig/g1", "\x1fbig/g2", "\x1fc/c1", "\x1fc/c2"]
    assert service.stats().tenants == [TenantStats("big", 3, 3 * OBJ, 0, 0),
                                       TenantStats("c", 2, 2 * OBJ, 2 * OBJ, 1),
                                       TenantStats("default", 0, 0, 2 * OBJ, 0)]


# ----- global pressure: the 15th object crosses 0.9 of 64 KiB; 0.25 frees 4 objects
def pressure_service(small: int, hog: int) -> MasterService:
    """Tenant small puts ``small`` objects first (the oldest), then hog puts ``hog``."""
    service, _ = make_service(evict_ratio=0.25)
    mount(service, "seg0")
    join(service, "small", "hog")
    for i in range(small):
        put(service, "small", f"s{i}")
    for i in range(hog):
        put(service, "hog", f"h{i:02d}")
    return service


def test_global_eviction_takes_from_a_tenant_over_its_fair_share_first() -> None:
    service = pressure_service(small=2, hog=13)  # hog holds 52 KiB, its share is 32 KiB
    assert objects(service) == [f"\x1fhog/h{i:02d}" for i in range(4, 13)] + [
        "\x1fsmall/s0", "\x1fsmall/s1"]  # plain LRU would have taken s0 and s1
    assert service.tenants.evicted == {"hog": 4}
    service.check_integrity()


def test_once_back_at_its_share_the_rest_is_taken_oldest_first() -> None:
    service = pressure_service(small=6, hog=9)  # hog is 4 KiB over its 32 KiB share
    assert objects(service) == [f"\x1fhog/h{i:02d}" for i in range(1, 9)] + [
        "\x1fsmall/s3", "\x1fsmall/s4", "\x1fsmall/s5"]
    assert service.tenants.evicted == {"hog": 1, "small": 3}
    service.check_integrity()


def test_one_tenant_evicts_exactly_as_before() -> None:
    service = pressure_service(small=0, hog=15)
    assert objects(service) == [f"\x1fhog/h{i:02d}" for i in range(4, 15)]


def test_a_round_with_no_tenant_over_its_share_looks_only_at_what_it_takes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fair-share pass ends at the first object it would skip once no tenant is over
    its share: a round reads about as many objects as it evicts, not every one stored."""
    service, _ = make_service(evict_ratio=0.01)
    mount(service, "seg0", size=1024 * OBJ)  # the 922nd object crosses 0.9; 1% is 11
    join(service, "a", "b")
    for i in range(460):
        put(service, "a", f"a{i}")
        put(service, "b", f"b{i}")
    looked: list[str] = []
    group_of = service.table.group_of
    monkeypatch.setattr(service.table, "group_of",
                        lambda obj: looked.append(obj.key) or group_of(obj))
    put(service, "a", "a460")
    put(service, "b", "b460")
    assert service.counters["evicted"] == 11
    gone = {f"\x1f{t}/{t}{i}" for t in "ab" for i in range(461)} - set(objects(service))
    assert gone == {f"\x1fa/a{i}" for i in range(6)} | {f"\x1fb/b{i}" for i in range(5)}
    assert len(looked) < 30, len(looked)  # not all 922
    service.check_integrity()


# ----- accounting through the disk tier and lost segments
def test_usage_follows_offloads_promotions_and_lost_segments() -> None:
    service, _ = make_service(TenantPolicy("a", 2 * OBJ))
    seg = mount(service, "seg0", disk_capacity=SEGMENT, control_endpoint="127.0.0.1:2")
    join(service, "a")
    put(service, "a", "a0")
    put(service, "a", "a1")
    ids = [service.object_id(key, "a") for key in ("a0", "a1")]
    put(service, "a", "a2")  # a0 goes to disk; its memory still held while it copies
    assert service.drain_tasks() == [OffloadTask(A + "a0", seg, 0, OBJ)]
    assert (service.tenants.used, service.tenants.offloading) == ({"a": 3 * OBJ}, {"a": OBJ})
    assert service.tenants.held("a") == 2 * OBJ
    service.check_integrity()
    service.offload_done(OffloadTask(A + "a0", seg, 0, OBJ, object_id=ids[0]), ok=True)
    assert (service.tenants.used, service.tenants.offloading) == ({"a": 2 * OBJ}, {})
    assert service.get_replicas("a0", "a") is ErrorCode.REPLICA_IS_NOT_READY
    assert service.drain_tasks() == [OffloadTask(A + "a1", seg, OBJ, OBJ),  # makes room
                                     PromoteTask(A + "a0", seg, 0, OBJ)]
    assert service.tenants.used == {"a": 3 * OBJ}
    service.check_integrity()
    service.drop_client("node-seg0")
    assert (service.tenants.used, objects(service)) == ({}, [])
    service.offload_done(OffloadTask(A + "a1", seg, OBJ, OBJ, object_id=ids[1]), ok=True)
    assert service.tenants.offloading == {}
    service.check_integrity()


def test_recount_rebuilds_usage_from_the_objects() -> None:
    service, _, _ = quota_service()
    service.tenants.used.clear()  # as after restoring objects straight into the service
    with pytest.raises(AssertionError):
        service.check_integrity()
    service.recount_tenants()
    assert service.tenants.used == {"a": 4 * OBJ, "b": 4 * OBJ}
    service.check_integrity()


# ----- what operators see
def test_stats_and_metrics_show_each_tenant() -> None:
    service, clock, _ = quota_service()
    clock.now = 10.0
    put(service, "a", "a4")
    rows = service.stats().tenants
    assert rows == [TenantStats("a", 4, 4 * OBJ, 4 * OBJ, 1),
                    TenantStats("b", 4, 4 * OBJ, 0, 0),
                    TenantStats("default", 0, 0, 0, 0)]  # the nodes' tenant
    text = render_metrics(service.stats(), service.counters, {})
    assert 'kvcake_store_tenant_used_bytes{tenant="a"} 16384' in text
    assert 'kvcake_store_tenant_quota_bytes{tenant="b"} 0' in text
    assert 'kvcake_store_tenant_keys{tenant="b"} 4' in text
    assert 'kvcake_store_tenant_evicted_total{tenant="a"} 1' in text


class _NoScan(dict[str, Any]):
    """The objects, refusing to be walked (``len`` and lookups still work)."""

    def _walked(self, *_: Any) -> Any:
        raise AssertionError("stats walked every object")

    values = items = keys = __iter__ = _walked


def test_stats_are_kept_as_objects_change_not_counted_from_them() -> None:
    """The master answers stats (and so every metrics scrape) without walking its objects:
    at 200k objects that walk held its loop for about 0.2 s."""
    service, clock, _ = quota_service()
    clock.now = 10.0
    put(service, "a", "a4")  # evicts a0
    assert service.remove("b0", tenant="b") is ErrorCode.OK
    expected = (7, 7, [4, 3])  # keys, replicas, keys of a and of b
    objects_now = service.table.objects
    service.table.objects = service.objects = _NoScan(objects_now)
    try:
        stats = service.stats()
    finally:
        service.table.objects = service.objects = objects_now
    assert (stats.num_keys, stats.num_replicas,
            [row.num_keys for row in stats.tenants[:2]]) == expected
    service.check_integrity()  # which recounts both from the objects


# ----- configuration
def test_quota_flags_and_files(tmp_path: Path) -> None:
    assert parse_tenant_quota("acme=512MiB") == TenantPolicy("acme", 512 << 20)
    with pytest.raises(InvalidParamsError, match="NAME=SIZE"):
        parse_tenant_quota("acme")
    toml = tmp_path / "tenants.toml"
    toml.write_text('default_quota = "1GiB"\n[tenants.acme]\nquota = "2GiB"\ntoken = "t0k"\n'
                    '[tenants.free]\n')
    default, policies = load_tenants(str(toml))
    assert default == 1 << 30
    assert policies == (TenantPolicy("acme", 2 << 30, "t0k"), TenantPolicy("free"))
    assert "t0k" not in repr(policies)
    merged = merge_tenants(policies, [TenantPolicy("acme", 1 << 20), TenantPolicy("new", 5)])
    assert merged == (TenantPolicy("acme", 1 << 20, "t0k"), TenantPolicy("free"),
                      TenantPolicy("new", 5))
    js = tmp_path / "tenants.json"
    js.write_text(json.dumps({"tenants": {"x": {"quota": 4096}}}))
    assert load_tenants(str(js)) == (None, (TenantPolicy("x", 4096),))
    for bad in ('tenants = 3', '[tenants.x]\nquota = -1', '[tenants.x]\nsize = 1', 'oops = 1',
                '[tenants."a/b"]', 'not toml ['):
        toml.write_text(bad)
        with pytest.raises(InvalidParamsError):
            load_tenants(str(toml))
    with pytest.raises(InvalidParamsError, match="cannot read"):
        load_tenants(str(tmp_path / "missing.toml"))


def test_master_flags_map_onto_tenant_config(tmp_path: Path) -> None:
    file = tmp_path / "tenants.toml"
    file.write_text('default_quota = "1MiB"\n[tenants.a]\nquota = "2MiB"\ntoken = "t"\n')
    args = build_parser().parse_args(["master", "--tenants-file", str(file), "--tenant-quota",
                                      "a=3MiB", "--tenant-quota", "b=0"])
    overrides = tenant_overrides(args)
    config = MasterConfig(**overrides)  # type: ignore[arg-type]
    assert config.default_tenant_quota_bytes == 1 << 20
    assert config.tenants == (TenantPolicy("a", 3 << 20, "t"), TenantPolicy("b", 0))
    bare = tenant_overrides(build_parser().parse_args(["master", "--default-tenant-quota", "4KiB"]))
    assert bare == {"default_tenant_quota_bytes": 4096, "tenants": None}


# ----- over real processes
@pytest.fixture
def tenants_cluster(tmp_path: Path) -> Iterator[str]:
    file = tmp_path / "tenants.toml"
    file.write_text('[tenants.alice]\ntoken = "alice-token"\n')
    started: list[ServerProcess] = []
    try:
        master, endpoint = start_master("--tenants-file", str(file), "--tenant-quota",
                                        "bob=1MiB")
        started.append(master)
        started.append(start_node(endpoint, "16MiB"))
        yield endpoint
    finally:
        for process in reversed(started):
            process.stop()


def test_two_tenants_over_processes_are_isolated_byte_exact(tenants_cluster: str) -> None:
    alice, bob, intruder = DistributedStore(), DistributedStore(), DistributedStore()
    try:
        assert alice.setup("127.0.0.1", "p2p", 0, 16 << 20, "tcp", "", tenants_cluster,
                           tenant_id="alice", tenant_token="alice-token") == 0
        assert bob.setup("127.0.0.1", "p2p", 0, 16 << 20, "tcp", "", tenants_cluster,
                         tenant_id="bob") == 0
        assert intruder.setup("127.0.0.1", "p2p", 0, 16 << 20, "tcp", "", tenants_cluster,
                              tenant_id="alice") == ErrorCode.ILLEGAL_CLIENT
        a_value, b_value = bytes(range(256)) * 1024, b"\xb0" * 300_000
        assert alice.put("shared", a_value) == 0
        assert bob.put("shared", b_value) == 0  # not OBJECT_ALREADY_EXISTS: its own object
        assert alice.get("shared") == a_value and bob.get("shared") == b_value
        assert alice.put("alice-only", b"a" * 1000) == 0
        assert bob.is_exist("alice-only") == 0 and bob.get("alice-only") == b""
        assert bob.remove("alice-only") == ErrorCode.OBJECT_NOT_FOUND
        assert bob.remove_all(force=True) == 1  # its "shared" only (leased by its get)
        assert alice.get("shared") == a_value and alice.is_exist("alice-only") == 1
        for i in range(4):  # 4 x 300 KB against bob's 1 MiB: bob evicts its own
            assert bob.put(f"b{i}", b_value) == 0
        assert [bob.is_exist(f"b{i}") for i in range(4)] == [0, 1, 1, 1]
        assert alice.get("shared") == a_value
        assert bob.put("too-big", b"x" * (2 << 20)) == ErrorCode.NO_AVAILABLE_HANDLE
        rows = {t.tenant: t for t in alice.stats().tenants}
        assert (rows["alice"].num_keys, rows["bob"].num_keys, rows["bob"].evicted) == (2, 3, 1)
        assert rows["bob"].used_bytes == 3 * len(b_value)
    finally:
        for store in (alice, bob, intruder):
            store.close()
