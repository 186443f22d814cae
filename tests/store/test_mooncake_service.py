"""The master's side of Mooncake's newer API, driven directly with a fake clock: upserts,
object groups, replica queries and clears, regex removal, shared segment names."""

from __future__ import annotations

from typing import Any

import pytest

from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.journal import object_record, restore, segment_record
from kvcake.store.master.replica import ReplicaState
from kvcake.store.master.service import MasterService
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire.store import (
    SOFT_PIN_DISABLE,
    SOFT_PIN_ENABLE,
    ReplicaHandle,
    ReplicaInfo,
    ReplicateConfig,
)

KIB = 1 << 10
OBJ = 4 * KIB
SEGMENT = 64 * KIB  # 16 objects
LEASE_S = 5.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_service(**fields: Any) -> tuple[MasterService, FakeClock]:
    fields.setdefault("seed", 1)
    fields.setdefault("lease_ttl_s", LEASE_S)
    clock = FakeClock()
    return MasterService(MasterConfig(**fields), clock), clock


def descriptor(name: str, endpoint: str = "127.0.0.1:1", host: str = "") -> SegmentDescriptor:
    return SegmentDescriptor(name=name, segment_id=0, size=SEGMENT,
                             host_id=host or f"host-{name}", endpoint=endpoint, shm_socket="",
                             shm_inode=0)


def mount(service: MasterService, client_id: str, name: str, endpoint: str = "127.0.0.1:1",
          host: str = "") -> int:
    if client_id not in service.registry.clients:
        service.register_client(client_id, host or f"host-{client_id}")
    return service.mount_segment(client_id, descriptor(name, endpoint, host))


def put(service: MasterService, client_id: str, key: str, size: int = OBJ,
        group: str | None = None, upsert: bool = False, **config: Any) -> list[ReplicaHandle]:
    handles = service.put_start(client_id, key, size, ReplicateConfig(**config), group, upsert)
    assert isinstance(handles, list), handles
    assert service.put_end(client_id, key) is ErrorCode.OK
    return handles


def used(service: MasterService) -> int:
    return service.memory_usage()[0]


# ----- upsert
def test_upsert_replaces_a_value_and_a_put_keeps_it() -> None:
    service, _ = make_service()
    seg = mount(service, "c1", "seg")
    assert put(service, "c1", "k") == [ReplicaHandle(seg, 0)]
    assert service.put_start("c1", "k", 2 * OBJ, ReplicateConfig()) is \
        ErrorCode.OBJECT_ALREADY_EXISTS
    first = service.objects["k"].replicas[0]
    assert put(service, "c1", "k", 2 * OBJ, upsert=True) == [ReplicaHandle(seg, 0)]
    assert first.state is ReplicaState.REMOVED  # not leased: its memory was reused at once
    assert service.get_replicas("k") == (2 * OBJ, [ReplicaHandle(seg, 0)])
    assert used(service) == 2 * OBJ
    assert put(service, "c1", "fresh", upsert=True)  # an upsert of a new key is a put
    service.check_integrity()


def test_a_leased_objects_memory_outlives_its_upsert_until_the_lease_ends() -> None:
    service, clock = make_service()
    seg = mount(service, "c1", "seg")
    put(service, "c1", "k")
    assert service.get_replicas("k") == (OBJ, [ReplicaHandle(seg, 0)])  # a reader's lease
    assert put(service, "c1", "k", upsert=True) == [ReplicaHandle(seg, OBJ)]
    assert used(service) == 2 * OBJ  # the reader may still be reading offset 0
    service.check_integrity()
    clock.now += LEASE_S - 0.1
    service.tick()
    assert used(service) == 2 * OBJ
    clock.now += 0.2
    service.tick()
    assert used(service) == OBJ
    assert put(service, "c1", "other") == [ReplicaHandle(seg, 0)]  # the old range is free
    service.check_integrity()


def test_an_upsert_takes_over_an_open_put_whose_memory_waits_out_the_put_timeout() -> None:
    service, clock = make_service(put_timeout_s=30.0, client_ttl_s=3600.0)
    mount(service, "c1", "seg")
    service.register_client("c2", "host-c2")
    assert isinstance(service.put_start("c1", "k", OBJ, ReplicateConfig()), list)
    put(service, "c2", "k", upsert=True)
    assert service.put_end("c1", "k") is ErrorCode.INVALID_WRITE  # the preempted writer
    assert used(service) == 2 * OBJ
    clock.now += 31.0
    service.tick()
    assert used(service) == OBJ
    service.check_integrity()


@pytest.mark.parametrize(("config", "pinned_after"), [
    ({}, True),  # PRESERVE
    ({"soft_pin_action": SOFT_PIN_DISABLE}, False),
    ({"soft_pin_action": SOFT_PIN_ENABLE, "soft_pin_ttl_s": 7.0}, True),
])
def test_upsert_carries_pins_over_as_its_soft_pin_action_says(config: dict[str, Any],
                                                              pinned_after: bool) -> None:
    service, clock = make_service()
    mount(service, "c1", "seg")
    put(service, "c1", "k", with_hard_pin=True, soft_pin_action=SOFT_PIN_ENABLE,
        soft_pin_ttl_s=60.0)
    put(service, "c1", "k", upsert=True, **config)
    obj = service.objects["k"]
    assert obj.hard_pinned  # never dropped by an upsert
    assert obj.soft_pinned(clock.now) is pinned_after
    if "soft_pin_ttl_s" in config:
        assert obj.soft_pin_until == clock.now + 7.0


@pytest.mark.parametrize("config", [
    {"soft_pin_ttl_s": 1.0},  # a ttl without ENABLE
    {"soft_pin_ttl_s": 1.0, "soft_pin_action": SOFT_PIN_DISABLE},
    {"with_soft_pin": True, "soft_pin_action": SOFT_PIN_DISABLE},
    {"soft_pin_action": 3},
    {"soft_pin_ttl_s": -1.0, "soft_pin_action": SOFT_PIN_ENABLE},
])
def test_contradicting_soft_pin_settings_are_refused(config: dict[str, Any]) -> None:
    service, _ = make_service()
    mount(service, "c1", "seg")
    with pytest.raises(InvalidParamsError):
        service.put_start("c1", "k", OBJ, ReplicateConfig(**config))
    assert not service.objects


def test_an_object_the_disk_tier_is_moving_cannot_be_upserted() -> None:
    service, _ = make_service()
    mount(service, "c1", "seg")
    put(service, "c1", "k")
    service.objects["k"].busy = 1
    assert service.put_start("c1", "k", OBJ, ReplicateConfig(), upsert=True) is \
        ErrorCode.OBJECT_REPLICA_BUSY


# ----- groups
def test_a_group_shares_placement_leases_and_membership() -> None:
    service, _ = make_service()
    seg_a, seg_b, seg_c = (mount(service, c, n) for c, n in (("a", "sa"), ("b", "sb"),
                                                            ("c", "sc")))
    first = put(service, "a", "g1", group="g", preferred_segment="sb")
    assert first == [ReplicaHandle(seg_b, 0)]
    for i in range(5):  # random placement, yet every member joins the group's segment
        assert put(service, "a", f"g{i + 2}", group="g")[0].segment_id == seg_b
    assert put(service, "a", "solo", preferred_segment="sa") == [ReplicaHandle(seg_a, 0)]
    assert all(o.segment_id != seg_c for k in service.objects
               for o in service.objects[k].replicas)
    assert service.get_replicas("g3") != ErrorCode.OBJECT_NOT_FOUND
    leased = {k for k, o in service.objects.items() if o.leased(service.clock())}
    assert leased == {f"g{i}" for i in range(1, 7)}  # one get leased the whole group
    assert service.put_start("a", "g1", OBJ, ReplicateConfig(), group="other",
                             upsert=True) is ErrorCode.INVALID_PARAMS
    assert service.put_start("a", "g1", OBJ, ReplicateConfig(), group="",
                             upsert=True) is ErrorCode.INVALID_PARAMS
    put(service, "a", "g1", upsert=True)  # no group given: it stays in its own
    assert service.objects["g1"].group == "g"
    service.check_integrity()


def test_a_group_leaves_memory_together_and_not_while_a_member_is_leased() -> None:
    service, clock = make_service(high_watermark=0.5, evict_ratio=0.01)  # one unit a round
    mount(service, "c1", "seg")
    put(service, "c1", "old")
    for key in ("m1", "m2", "m3"):
        put(service, "c1", key, group="g")
    for i in range(4):  # 8 of 16 objects: at the watermark, nothing evicted yet
        put(service, "c1", f"x{i}")
    assert service.get_replicas("m2") != ErrorCode.OBJECT_NOT_FOUND  # leases m1..m3
    put(service, "c1", "x4")  # over the watermark: the oldest unit goes
    assert set(service.objects) == {"m1", "m2", "m3", *(f"x{i}" for i in range(5))}
    clock.now += LEASE_S + 1
    put(service, "c1", "x5")  # the group is the oldest now, and goes as one
    assert set(service.objects) == {f"x{i}" for i in range(6)}
    service.check_integrity()


def test_groups_are_per_tenant_and_survive_a_failover() -> None:
    service, _ = make_service()
    mount(service, "c1", "seg")
    service.register_client("t", "host-t", tenant="acme")
    put(service, "c1", "k1", group="g")
    put(service, "t", "k2", group="g")
    assert service.objects["k1"].group != next(o.group for k, o in service.objects.items()
                                               if k.endswith("/k2"))
    records = [(k, object_record(o, service.clock())) for k, o in service.objects.items()]
    segments = [segment_record(service, s) for s in service.registry.segments.values()]
    again, _ = make_service()
    restore(again, segments, [(k, r) for k, r in records if r is not None])
    assert again.objects["k1"].group == "g"
    assert again.table.groups.members("g") == {"k1"}
    again.check_integrity()


# ----- queries, clears, regex
def test_a_replica_query_describes_every_copy_and_leases_it() -> None:
    service, clock = make_service()
    mount(service, "c1", "sa", "10.0.0.1:5")
    mount(service, "c2", "sb", "10.0.0.2:5")
    put(service, "c1", "k", replica_num=2)
    found = service.query_replicas("k")
    assert isinstance(found, tuple) and found[0] == OBJ
    assert sorted(found[1], key=lambda i: i.segment) == [
        ReplicaInfo("memory", "complete", "sa", "10.0.0.1:5", 0, OBJ),
        ReplicaInfo("memory", "complete", "sb", "10.0.0.2:5", 0, OBJ)]
    assert service.objects["k"].lease_until == clock.now + LEASE_S
    assert service.query_replicas("nope") is ErrorCode.OBJECT_NOT_FOUND


def test_replica_clear_drops_only_the_callers_unleased_objects() -> None:
    service, clock = make_service()
    mount(service, "c1", "sa")
    mount(service, "c2", "sb")
    put(service, "c1", "mine", replica_num=2)
    put(service, "c2", "theirs")
    put(service, "c1", "leased")
    assert service.exist("leased")
    assert not service.replica_clear("c1", "theirs")
    assert not service.replica_clear("c1", "leased")
    assert not service.replica_clear("c1", "missing")
    assert not service.replica_clear("c1", "mine", "no-such-segment")
    assert service.replica_clear("c1", "mine", "sa")  # one of two copies
    found = service.query_replicas("mine")
    assert isinstance(found, tuple) and [i.segment for i in found[1]] == ["sb"]
    clock.now += LEASE_S + 1
    assert service.replica_clear("c1", "mine", "sb")  # its last copy: the object goes
    assert "mine" not in service.objects
    assert service.replica_clear("c1", "leased")
    assert set(service.objects) == {"theirs"}
    service.check_integrity()


def test_remove_by_regex_removes_the_tenants_unleased_matches() -> None:
    service, _ = make_service()
    mount(service, "c1", "seg")
    service.register_client("t", "host-t", tenant="acme")
    for key in ("layer-1", "layer-2", "keep", "layer-3"):
        put(service, "c1", key)
    put(service, "t", "layer-9")
    assert service.exist("layer-3")
    assert service.remove_by_regex(r"^layer-\d") == 2  # layer-3 is leased
    assert {k for k in service.objects if "acme" not in k} == {"keep", "layer-3"}
    assert service.remove_by_regex("layer", force=True) == 1
    assert service.remove_by_regex("layer", tenant="acme") == 1
    with pytest.raises(InvalidParamsError, match="bad regex"):
        service.remove_by_regex("(")
    service.check_integrity()


# ----- segment names, Mooncake's way
def test_two_clients_may_share_a_segment_name_but_not_a_segment() -> None:
    service, _ = make_service()
    one = mount(service, "c1", "localhost:12345", "127.0.0.1:7001")
    two = mount(service, "c2", "localhost:12345", "127.0.0.1:7002")
    assert one != two
    with pytest.raises(KvcakeError) as alias:  # c2 naming c1's memory again
        service.mount_segment("c2", descriptor("localhost:12345", "127.0.0.1:7001"))
    assert alias.value.code is ErrorCode.SEGMENT_ALREADY_EXISTS
    put(service, "c1", "k", replica_num=2)  # one name is one place: a single copy
    assert len(service.objects["k"].replicas) == 1
    assert service.replica_clear("c1", "k", "localhost:12345")
    assert "k" not in service.objects
    mount(service, "c4", "other", "127.0.0.1:7004")
    for i in range(8):  # two copies: one under each name, whichever segment of the shared one
        names = [service.registry.segments[h.segment_id].name
                 for h in put(service, "c1", f"r{i}", replica_num=2)]
        assert sorted(names) == ["localhost:12345", "other"]
        assert service.replica_clear("c1", f"r{i}", "localhost:12345")
        found = service.query_replicas(f"r{i}")
        assert isinstance(found, tuple) and [r.segment for r in found[1]] == ["other"]
    service.unmount_segment("c1", one)
    assert mount(service, "c3", "localhost:12345", "127.0.0.1:7001") not in (one, two)
    service.check_integrity()


def test_same_host_placement_prefers_the_writers_host() -> None:
    service, _ = make_service()
    here = mount(service, "c1", "near", host="H")
    mount(service, "c2", "far", host="other")
    for i in range(6):
        assert put(service, "c1", f"k{i}", prefer_same_host=True)[0].segment_id == here
