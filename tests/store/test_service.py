"""MasterService driven directly with a fake clock: exact offsets, states and eviction order."""

from __future__ import annotations

from itertools import product
from typing import Any

import pytest

from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError
from kvcake.common.lifecycle import IllegalTransitionError
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.replica import Replica, ReplicaState, Tier
from kvcake.store.master.service import MasterService
from kvcake.store.master.tiering import DropDiskTask, OffloadTask, PromoteTask
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire.store import ReplicaHandle, ReplicateConfig

KIB = 1 << 10
OBJ = 4 * KIB  # 16 objects fill a 64 KiB segment
SEGMENT = 64 * KIB

Snapshot = dict[str, tuple[int, list[tuple[int, int, str, str]]]]


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_service(**fields: Any) -> tuple[MasterService, FakeClock]:
    fields.setdefault("seed", 1)
    clock = FakeClock()
    return MasterService(MasterConfig(**fields), clock), clock


def descriptor(name: str, size: int = SEGMENT) -> SegmentDescriptor:
    return SegmentDescriptor(name=name, segment_id=0, size=size, host_id=f"host-{name}",
                             endpoint="127.0.0.1:1", shm_socket="", shm_inode=0)


def mount(service: MasterService, client_id: str, name: str, size: int = SEGMENT,
          **kwargs: Any) -> int:
    if client_id not in service.registry.clients:
        service.register_client(client_id, f"host-{client_id}")
    return service.mount_segment(client_id, descriptor(name, size), **kwargs)


def start(service: MasterService, client_id: str, key: str, size: int = OBJ,
          **config: Any) -> list[ReplicaHandle]:
    handles = service.put_start(client_id, key, size, ReplicateConfig(**config))
    assert isinstance(handles, list), handles
    return handles


def put(service: MasterService, client_id: str, key: str, size: int = OBJ,
        **config: Any) -> list[ReplicaHandle]:
    handles = start(service, client_id, key, size, **config)
    assert service.put_end(client_id, key) is ErrorCode.OK
    return handles


def states(service: MasterService, key: str) -> list[ReplicaState]:
    return [r.state for r in service.objects[key].replicas]


def snapshot(service: MasterService) -> Snapshot:
    return {key: (obj.size, [(r.segment_id, r.offset, r.tier.value, r.state.value)
                             for r in obj.replicas])
            for key, obj in service.objects.items()}


def keys(n: int) -> list[str]:
    return [f"k{i:02d}" for i in range(n)]


# ----- two-phase put

def test_two_phase_put_reserves_exact_offsets_and_hides_the_key_until_put_end() -> None:
    service, _ = make_service()
    seg = mount(service, "c1", "seg0")
    service.register_client("c2", "host-c2")
    assert start(service, "c1", "k1", 100) == [ReplicaHandle(seg, 0)]
    assert start(service, "c1", "k2", 1000) == [ReplicaHandle(seg, 128)]
    assert states(service, "k1") == [ReplicaState.PROCESSING]
    assert service.get_replicas("k1") is ErrorCode.OBJECT_NOT_FOUND
    assert not service.exist("k1")
    assert service.stats().num_keys == 0

    assert service.put_end("c1", "k1") is ErrorCode.OK
    assert states(service, "k1") == [ReplicaState.COMPLETE]
    assert service.get_replicas("k1") == (100, [ReplicaHandle(seg, 0)])
    assert service.exist("k1")

    used = service.memory_usage()[0]
    assert used == 128 + 1024
    assert service.put_start("c1", "k1", 100, ReplicateConfig()) is \
        ErrorCode.OBJECT_ALREADY_EXISTS
    assert service.put_start("c2", "k2", 100, ReplicateConfig()) is \
        ErrorCode.OBJECT_ALREADY_EXISTS  # a put still in progress counts as there
    assert service.memory_usage()[0] == used

    assert service.put_end("c2", "k2") is ErrorCode.INVALID_WRITE
    assert service.put_revoke("c2", "k2") is ErrorCode.INVALID_WRITE
    assert states(service, "k2") == [ReplicaState.PROCESSING]
    assert service.put_end("c1", "k1") is ErrorCode.OK  # its own, ended: a retry is a no-op
    assert service.put_end("c2", "k1") is ErrorCode.INVALID_WRITE  # complete, and not c2's
    assert service.put_end("c1", "nope") is ErrorCode.OBJECT_NOT_FOUND

    replica = service.objects["k2"].replicas[0]
    assert service.put_revoke("c1", "k2") is ErrorCode.OK
    assert replica.state is ReplicaState.FAILED
    assert "k2" not in service.objects
    assert service.memory_usage()[0] == 128
    assert start(service, "c1", "k3", 64) == [ReplicaHandle(seg, 128)]  # the space is back
    service.check_integrity()


def test_remove_takes_complete_replicas_to_removed_and_frees_them() -> None:
    service, _ = make_service()
    seg = mount(service, "c1", "seg0")
    put(service, "c1", "k1")
    replica = service.objects["k1"].replicas[0]
    assert service.remove("k1") is ErrorCode.OK
    assert replica.state is ReplicaState.REMOVED
    assert service.remove("k1") is ErrorCode.OBJECT_NOT_FOUND
    assert put(service, "c1", "k1") == [ReplicaHandle(seg, 0)]
    service.check_integrity()


# ----- replicas and placement

def test_replicas_land_on_distinct_segments() -> None:
    service, _ = make_service()
    seg_a = mount(service, "c1", "a")
    seg_b = mount(service, "c2", "b")
    handles = put(service, "c1", "k1", replica_num=2)
    assert set(handles) == {ReplicaHandle(seg_a, 0), ReplicaHandle(seg_b, 0)}
    assert states(service, "k1") == [ReplicaState.COMPLETE] * 2
    found = service.get_replicas("k1")
    assert isinstance(found, tuple)
    assert (found[0], set(found[1])) == (OBJ, set(handles))
    service.check_integrity()


def test_more_replicas_than_segments_is_best_effort() -> None:
    service, _ = make_service()
    seg = mount(service, "c1", "only")
    assert put(service, "c1", "k1", replica_num=3) == [ReplicaHandle(seg, 0)]
    assert service.stats().num_replicas == 1
    service.check_integrity()


def test_preferred_segment_goes_first_under_any_policy() -> None:
    service, _ = make_service()
    segs = {name: mount(service, "c1", name) for name in ("a", "b", "c")}
    for i in range(5):
        assert put(service, "c1", f"b{i}", preferred_segment="b") == [
            ReplicaHandle(segs["b"], i * OBJ)]
    handles = put(service, "c1", "two", replica_num=2, preferred_segment="c")
    assert handles[0] == ReplicaHandle(segs["c"], 0)
    assert handles[1].segment_id in (segs["a"], segs["b"])
    service.check_integrity()


def test_free_ratio_first_fills_the_emptiest_segment() -> None:
    service, _ = make_service(placement="free_ratio_first")
    low, high = sorted([mount(service, "c1", "a"), mount(service, "c1", "b")])
    placed = [put(service, "c1", key)[0] for key in keys(4)]
    # equal free ratios go to the lower id first
    assert placed == [ReplicaHandle(low, 0), ReplicaHandle(high, 0),
                      ReplicaHandle(low, OBJ), ReplicaHandle(high, OBJ)]
    service.check_integrity()


def test_local_first_prefers_the_writers_own_segment() -> None:
    service, _ = make_service(placement="local_first")
    seg_a = mount(service, "c1", "a")
    seg_b = mount(service, "c2", "b")
    service.register_client("c3", "host-c3")
    assert [put(service, "c1", f"x{i}")[0] for i in range(3)] == [
        ReplicaHandle(seg_a, i * OBJ) for i in range(3)]  # though b is emptier
    assert put(service, "c2", "y")[0] == ReplicaHandle(seg_b, 0)
    assert put(service, "c3", "z")[0] == ReplicaHandle(seg_b, OBJ)  # no own: the emptiest
    service.check_integrity()


def test_random_placement_uses_every_segment() -> None:
    service, _ = make_service(placement="random")
    segs = {mount(service, "c1", "a"), mount(service, "c1", "b")}
    used = {put(service, "c1", key, 64)[0].segment_id for key in keys(30)}
    assert used == segs
    assert service.placement.name == "random"
    service.check_integrity()


@pytest.mark.parametrize("field", ["placement", "eviction"])
def test_unknown_policy_names_are_refused(field: str) -> None:
    with pytest.raises(InvalidParamsError, match="unknown"):
        make_service(**{field: "nope"})


# ----- the replica lifecycle table

S = ReplicaState
LEGAL = {
    (S.INITIALIZED, S.PROCESSING), (S.INITIALIZED, S.REMOVED), (S.INITIALIZED, S.FAILED),
    (S.PROCESSING, S.COMPLETE), (S.PROCESSING, S.REMOVED), (S.PROCESSING, S.FAILED),
    (S.COMPLETE, S.REMOVED), (S.COMPLETE, S.FAILED),
}


@pytest.mark.parametrize(("source", "target"), list(product(ReplicaState, ReplicaState)))
def test_replica_moves_only_along_the_lifecycle_table(source: ReplicaState,
                                                      target: ReplicaState) -> None:
    replica = Replica(segment_id=1, offset=0, size=64, state=source)
    if (source, target) in LEGAL:
        replica.move_to(target)
        assert replica.state is target
    else:
        with pytest.raises(IllegalTransitionError) as caught:
            replica.move_to(target)
        assert caught.value.code is ErrorCode.INVALID_REPLICA
        assert replica.state is source


def test_a_replica_walks_the_happy_path_to_removed() -> None:
    replica = Replica(segment_id=1, offset=0, size=64)
    assert replica.state is S.INITIALIZED and not replica.readable
    for state in (S.PROCESSING, S.COMPLETE, S.REMOVED):
        replica.move_to(state)
        assert replica.readable == (state is S.COMPLETE)


# ----- leases

def test_a_lease_blocks_remove_until_it_expires_or_force() -> None:
    service, clock = make_service(lease_ttl_s=5.0)
    mount(service, "c1", "seg0")
    put(service, "c1", "k1")
    put(service, "c1", "k2")
    start(service, "c1", "writing")
    assert service.remove("k1") is ErrorCode.OK  # never read: no lease
    put(service, "c1", "k1")
    assert isinstance(service.get_replicas("k1"), tuple)
    assert service.objects["k1"].lease_until == 5.0
    clock.advance(4.9)
    assert service.remove("k1") is ErrorCode.OBJECT_HAS_LEASE
    clock.advance(0.1)  # exactly at lease_until: expired
    assert service.remove("k1") is ErrorCode.OK

    assert service.exist("k2")  # exist leases too
    assert service.remove("k2") is ErrorCode.OBJECT_HAS_LEASE
    assert service.remove("k2", force=True) is ErrorCode.OK
    assert service.remove("writing") is ErrorCode.REPLICA_IS_NOT_READY
    assert list(service.objects) == ["writing"]
    service.check_integrity()


# ----- eviction: 64 KiB, 4 KiB objects; the 15th crosses 0.9 and frees 0.25 (4 objects)

def eviction_service(disk_capacity: int = 0, **fields: Any) -> tuple[MasterService, FakeClock]:
    fields = {"high_watermark": 0.9, "evict_ratio": 0.25, "lease_ttl_s": 1.0, **fields}
    service, clock = make_service(**fields)
    mount(service, "c1", "seg0", disk_capacity=disk_capacity,
          control_endpoint="127.0.0.1:2" if disk_capacity else "")
    return service, clock


def remaining_after_eviction(service: MasterService, clock: FakeClock,
                             pins: dict[str, ReplicateConfig] | None = None,
                             last: ReplicateConfig | None = None) -> list[str]:
    """Put k00..k13 (no eviction yet), read k00 and k01, then put k14, which crosses the
    watermark and evicts 4 objects."""
    for key in keys(14):
        config = (pins or {}).get(key, ReplicateConfig())
        assert isinstance(service.put_start("c1", key, OBJ, config), list)
        assert service.put_end("c1", key) is ErrorCode.OK
    assert service.counters["evicted"] == 0
    for key in ("k00", "k01"):
        assert isinstance(service.get_replicas(key), tuple)  # touch
    clock.advance(2.0)  # leases over
    assert isinstance(service.put_start("c1", "k14", OBJ, last or ReplicateConfig()), list)
    assert service.put_end("c1", "k14") is ErrorCode.OK
    assert service.counters["evicted"] == 4
    service.check_integrity()
    return sorted(service.objects)


def test_lru_evicts_the_least_recently_used() -> None:
    service, clock = eviction_service()
    assert remaining_after_eviction(service, clock) == ["k00", "k01", *keys(15)[6:]]
    assert service.counters["evicted"] == 4
    assert service.memory_usage() == (11 * OBJ, SEGMENT)


def test_fifo_ignores_reads() -> None:
    service, clock = eviction_service(eviction="fifo")
    assert remaining_after_eviction(service, clock) == keys(15)[4:]


def test_eviction_skips_leased_objects() -> None:
    service, _ = eviction_service(eviction="fifo")
    for key in keys(14):
        put(service, "c1", key)
    assert service.exist("k00")  # leased, not touched
    put(service, "c1", "k14")
    assert sorted(service.objects) == ["k00", *keys(15)[5:]]
    service.check_integrity()


def test_a_pool_held_by_leases_is_scanned_once_per_lease_not_once_per_put(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stored object leased: a round frees nothing of them. Until a lease ends, later
    rounds look only at newcomers (and evict those, as a full scan would); then the oldest
    go again."""
    service, clock = eviction_service()
    for key in keys(14):
        put(service, "c1", key)
    assert all(service.exist(key) for key in keys(14))  # leased for 1 s, order unchanged
    put(service, "c1", "k14")  # crosses 0.9: only k14 itself may go
    assert sorted(service.objects) == keys(14)
    looked: list[str] = []
    group_of = service.table.group_of
    monkeypatch.setattr(service.table, "group_of",
                        lambda obj: looked.append(obj.key) or group_of(obj))
    for i in range(15, 35):
        clock.advance(0.01)
        put(service, "c1", f"k{i}")
    assert sorted(service.objects) == keys(14)  # each newcomer went, as before
    # only the newcomers, each once a pass that reaches it (not the 14 leased ones a put)
    assert set(looked) == {f"k{i}" for i in range(15, 35)} and len(looked) <= 2 * 20
    clock.advance(1.0)  # the leases are over: a full round again, oldest first
    put(service, "c1", "k35")
    assert sorted(service.objects) == [*keys(14)[4:], "k35"]
    service.check_integrity()


def test_hard_pinned_objects_are_never_evicted() -> None:
    service, clock = eviction_service()
    pinned = ReplicateConfig(with_hard_pin=True)
    assert remaining_after_eviction(service, clock, {"k02": pinned, "k03": pinned}) == [
        "k00", "k01", "k02", "k03", *keys(15)[8:]]


def test_soft_pinned_objects_go_only_when_nothing_else_is_left() -> None:
    service, clock = eviction_service()
    soft = ReplicateConfig(with_soft_pin=True)
    pins = {key: soft for key in keys(14) if key not in ("k05", "k06")}
    remaining = remaining_after_eviction(service, clock, pins, last=soft)
    # unpinned k05, k06 first; then the oldest soft-pinned, k02 and k03 (k00, k01 were read)
    assert remaining == ["k00", "k01", "k04", *keys(15)[7:]]


def test_soft_pins_expire() -> None:
    service, clock = eviction_service(soft_pin_ttl_s=10.0)
    put(service, "c1", "k00", with_soft_pin=True, soft_pin_ttl_s=100.0)
    for key in keys(14)[1:]:
        put(service, "c1", key, with_soft_pin=True)  # the config's ttl: 10 s
    clock.advance(11.0)
    put(service, "c1", "k14")
    # k01..k13 are plain objects again, so k14 (unpinned, newest) stays and k00 is spared
    assert sorted(service.objects) == ["k00", *keys(15)[5:]]
    service.check_integrity()


def test_when_everything_is_hard_pinned_a_put_gets_no_handle_and_nothing_is_lost() -> None:
    service, _ = eviction_service()
    for key in keys(16):
        put(service, "c1", key, with_hard_pin=True)
    before = snapshot(service)
    assert service.put_start("c1", "k16", OBJ, ReplicateConfig()) is \
        ErrorCode.NO_AVAILABLE_HANDLE
    assert snapshot(service) == before
    assert service.memory_usage() == (SEGMENT, SEGMENT)
    service.check_integrity()


# ----- liveness

def test_a_silent_client_is_dropped_with_its_segments_and_puts() -> None:
    service, clock = make_service(client_ttl_s=10.0)
    seg_a = mount(service, "a", "seg-a")
    seg_b = mount(service, "b", "seg-b")
    put(service, "a", "both", replica_num=2)
    put(service, "a", "only-a", preferred_segment="seg-a")
    put(service, "a", "only-b", preferred_segment="seg-b")
    start(service, "b", "b-writing", preferred_segment="seg-a")
    a_writing = start(service, "a", "a-writing", replica_num=2, preferred_segment="seg-a")
    assert a_writing == [ReplicaHandle(seg_a, 3 * OBJ), ReplicaHandle(seg_b, 2 * OBJ)]

    clock.advance(6.0)
    assert service.heartbeat("a")
    clock.advance(5.0)  # b silent for 11 s > 10 s
    service.tick()

    assert list(service.registry.clients) == ["a"]
    assert list(service.registry.segments) == [seg_a]
    assert sorted(service.objects) == ["a-writing", "both", "only-a"]
    assert service.get_replicas("both") == (OBJ, [ReplicaHandle(seg_a, 0)])
    assert service.get_replicas("only-b") is ErrorCode.OBJECT_NOT_FOUND
    assert service.memory_usage() == (3 * OBJ, SEGMENT)  # b's put on seg-a was revoked
    assert service.counters["dead_clients"] == 1
    assert not service.heartbeat("b")

    assert service.put_end("a", "a-writing") is ErrorCode.OK  # one replica survived
    assert service.get_replicas("a-writing") == (OBJ, [ReplicaHandle(seg_a, 3 * OBJ)])
    service.check_integrity()


def test_an_abandoned_put_is_reclaimed_after_put_timeout() -> None:
    service, clock = make_service(client_ttl_s=10.0, put_timeout_s=30.0)
    mount(service, "a", "seg0")
    put(service, "a", "done")
    start(service, "a", "abandoned")
    for _ in range(3):
        clock.advance(9.0)
        service.heartbeat("a")
        service.tick()
    assert "abandoned" in service.objects  # 27 s
    clock.advance(4.0)
    service.heartbeat("a")
    service.tick()  # 31 s
    assert list(service.objects) == ["done"]
    assert service.counters["reclaimed_puts"] == 1
    assert service.memory_usage()[0] == OBJ
    assert service.put_end("a", "abandoned") is ErrorCode.OBJECT_NOT_FOUND
    service.check_integrity()


def test_unmount_keeps_objects_with_a_replica_elsewhere() -> None:
    service, _ = make_service()
    seg_a = mount(service, "a", "seg-a")
    seg_b = mount(service, "a", "seg-b")
    put(service, "a", "both", replica_num=2)
    put(service, "a", "only-b", preferred_segment="seg-b")
    with pytest.raises(KvcakeError) as caught:
        service.unmount_segment("someone-else", seg_b)
    assert caught.value.code is ErrorCode.SEGMENT_NOT_FOUND
    service.unmount_segment("a", seg_b)
    assert service.get_replicas("both") == (OBJ, [ReplicaHandle(seg_a, 0)])
    assert sorted(service.objects) == ["both"]
    service.check_integrity()


# ----- bad input: a clear error, and nothing stored is lost

def bad_input_service() -> MasterService:
    service, _ = make_service(max_key_bytes=16)
    mount(service, "c1", "seg0")
    put(service, "c1", "kept", 1000)
    start(service, "c1", "writing", 2000)
    return service


@pytest.mark.parametrize(
    ("key", "size", "config", "code", "message"),
    [
        ("", 10, {}, ErrorCode.INVALID_KEY, "empty"),
        ("k" * 17, 10, {}, ErrorCode.INVALID_KEY, "17 bytes exceeds"),
        ("\u00e9" * 9, 10, {}, ErrorCode.INVALID_KEY, "18 bytes exceeds"),
        ("k", 0, {}, ErrorCode.INVALID_PARAMS, "must be > 0, got 0"),
        ("k", -64, {}, ErrorCode.INVALID_PARAMS, "must be > 0, got -64"),
        ("k", SEGMENT + 1, {}, ErrorCode.INVALID_PARAMS, f"of {SEGMENT + 1} bytes is larger"),
        ("k", 10, {"replica_num": 0}, ErrorCode.INVALID_PARAMS, "replica_num must be 1..16"),
        ("k", 10, {"replica_num": 17}, ErrorCode.INVALID_PARAMS, "got 17"),
        ("kept", 0, {}, ErrorCode.INVALID_PARAMS, "must be > 0"),
    ],
)
def test_a_bad_put_is_refused_with_a_clear_message(
    key: str, size: int, config: dict[str, Any], code: ErrorCode, message: str
) -> None:
    service = bad_input_service()
    before = snapshot(service)
    with pytest.raises(InvalidParamsError, match=message) as caught:
        service.put_start("c1", key, size, ReplicateConfig(**config))
    assert caught.value.code is code
    assert snapshot(service) == before
    assert service.memory_usage()[0] == 1024 + 2048
    service.check_integrity()


def test_bad_keys_on_reads_and_removes_are_refused() -> None:
    service = bad_input_service()
    before = snapshot(service)
    for key in ("", "x" * 17):
        for call in (service.get_replicas, service.exist, service.remove):
            with pytest.raises(InvalidParamsError) as caught:
                call(key)
            assert caught.value.code is ErrorCode.INVALID_KEY
    assert snapshot(service) == before
    service.check_integrity()


def test_an_unknown_client_cannot_put_or_mount() -> None:
    service = bad_input_service()
    before = snapshot(service)
    with pytest.raises(KvcakeError, match="unknown client 'ghost'") as caught:
        service.put_start("ghost", "k", 10, ReplicateConfig())
    assert caught.value.code is ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS
    with pytest.raises(KvcakeError, match="unknown client"):
        service.mount_segment("ghost", descriptor("ghost-seg"))
    assert snapshot(service) == before
    assert len(service.registry.segments) == 1
    service.check_integrity()


@pytest.mark.parametrize(
    ("segment", "disk", "control", "message"),
    [
        (descriptor(""), 0, "", "name must not be empty"),
        (descriptor("small", 4095), 0, "", "too small"),
        (SegmentDescriptor("nowhere", 0, SEGMENT, "h", "", "", 0), 0, "", "no endpoint"),
        (descriptor("disk"), -1, "127.0.0.1:2", "disk_capacity must be >= 0"),
        (descriptor("disk"), 1 << 20, "", "needs a control endpoint"),
    ],
)
def test_a_bad_mount_is_refused(segment: SegmentDescriptor, disk: int, control: str,
                                message: str) -> None:
    service = bad_input_service()
    before = snapshot(service)
    with pytest.raises(InvalidParamsError, match=message):
        service.mount_segment("c1", segment, disk, control)
    with pytest.raises(KvcakeError) as caught:
        service.mount_segment("c1", descriptor("seg0"))
    assert caught.value.code is ErrorCode.SEGMENT_ALREADY_EXISTS
    assert snapshot(service) == before
    assert len(service.registry.segments) == 1
    service.check_integrity()


def test_an_object_larger_than_a_segments_usable_space_is_refused_without_evicting() -> None:
    """A segment of 8 KiB + 32 bytes holds at most 8 KiB (whole 64-byte granules); a put of
    8 KiB + 32 bytes passes the size check, can never be placed, and must not evict."""
    service, _ = make_service()
    mount(service, "c1", "odd", 8 * KIB + 32)
    put(service, "c1", "kept", 64)
    before = snapshot(service)
    with pytest.raises(InvalidParamsError, match=f"{8 * KIB + 32} bytes"):
        service.put_start("c1", "big", 8 * KIB + 32, ReplicateConfig())
    assert snapshot(service) == before
    service.check_integrity()


# ----- the disk tier

def disk_service(disk_capacity: int = 1 << 20) -> tuple[MasterService, FakeClock, int]:
    """k00..k14 on a segment with a disk tier; k14 pushed k00..k03 out (offloads queued)."""
    service, clock = eviction_service(disk_capacity)
    for key in keys(15):
        put(service, "c1", key)
    return service, clock, next(iter(service.registry.segments))


def test_eviction_offloads_to_disk_and_reads_promote_back() -> None:
    service, clock, seg = disk_service()
    offloads = service.drain_tasks()
    assert offloads == [OffloadTask(key, seg, i * OBJ, OBJ) for i, key in enumerate(keys(4))]
    assert service.stats().disk_used_bytes == 4 * OBJ
    assert service.get_replicas("k00") == (OBJ, [ReplicaHandle(seg, 0)])  # still in memory
    assert service.memory_usage()[0] == 15 * OBJ

    assert isinstance(offloads[0], OffloadTask)
    service.offload_done(offloads[0], True)
    assert [(r.tier, r.state) for r in service.objects["k00"].replicas] == [
        (Tier.DISK, ReplicaState.COMPLETE)]
    assert service.memory_usage()[0] == 15 * OBJ  # its block, leased to the reader above
    clock.advance(service.config.lease_ttl_s)
    service.tick()
    assert service.memory_usage()[0] == 14 * OBJ  # free once that lease is over
    assert service.stats().offloaded == 1
    service.check_integrity()

    assert service.get_replicas("k00") is ErrorCode.REPLICA_IS_NOT_READY
    [promote] = service.drain_tasks()
    assert promote == PromoteTask("k00", seg, 15 * OBJ, OBJ)  # oldest free block of its class
    assert service.get_replicas("k00") is ErrorCode.REPLICA_IS_NOT_READY  # one promotion
    assert service.drain_tasks() == []
    service.promote_done(promote, True)
    assert service.get_replicas("k00") == (OBJ, [ReplicaHandle(seg, 15 * OBJ)])
    assert service.stats().promoted == 1
    service.check_integrity()

    assert isinstance(offloads[1], OffloadTask)
    service.offload_done(offloads[1], True)  # k01 now only on disk
    clock.advance(2.0)
    assert service.remove("k01") is ErrorCode.OK
    assert service.drain_tasks() == [DropDiskTask("k01", seg)]
    assert service.remove("k00") is ErrorCode.OK  # memory and disk
    assert service.drain_tasks() == [DropDiskTask("k00", seg)]
    assert service.stats().disk_used_bytes == 2 * OBJ  # k02, k03 still on their way

    assert isinstance(offloads[2], OffloadTask)
    service.offload_done(offloads[2], False)  # a failed offload drops the object
    assert "k02" not in service.objects
    assert service.stats().disk_used_bytes == OBJ
    service.check_integrity()


def test_a_full_disk_means_eviction_deletes() -> None:
    service, _, seg = disk_service(disk_capacity=2 * OBJ)
    assert service.drain_tasks() == [OffloadTask(key, seg, i * OBJ, OBJ)
                                     for i, key in enumerate(keys(2))]
    assert sorted(service.objects) == keys(2) + keys(15)[4:]
    service.check_integrity()


def finish(service: MasterService) -> list[str]:
    """Report every queued offload and promotion done; the keys they were for, in order."""
    done = []
    for task in service.drain_tasks():
        if isinstance(task, OffloadTask):
            service.offload_done(task, True)
        else:
            assert isinstance(task, PromoteTask), task
            service.promote_done(task, True)
        done.append(task.key)
    return done


def on_disk(service: MasterService) -> list[str]:
    return sorted(k for k, o in service.objects.items() if o.readable(Tier.DISK))


def test_a_full_disk_drops_its_least_recently_used_copies_for_newer_ones() -> None:
    service, clock, seg = disk_service(disk_capacity=6 * OBJ)
    assert finish(service) == keys(4)  # k00..k03 on disk, 2 objects of room left
    assert service.get_replicas("k01") is ErrorCode.REPLICA_IS_NOT_READY  # read: now recent
    assert finish(service) == ["k01"]
    clock.advance(2.0)  # leases over
    for key in ("k15", "k16", "k17"):  # the 15th in memory evicts k04..k07
        put(service, "c1", key)
    offload = [OffloadTask(f"k{i:02d}", seg, i * OBJ, OBJ) for i in range(4, 8)]
    tasks = service.drain_tasks()
    assert tasks == [*offload[:2], DropDiskTask("k00", seg), offload[2],
                     DropDiskTask("k02", seg), offload[3]]
    assert "k00" not in service.objects and "k02" not in service.objects  # disk-only: gone
    assert on_disk(service) == ["k01", "k03"]  # k01 was read since; k04..k07 on their way
    assert service.counters["disk_evicted"] == 2
    assert service.stats().disk_used_bytes == 6 * OBJ
    for task in tasks:
        if isinstance(task, OffloadTask):
            service.offload_done(task, True)
    service.check_integrity()
    clock.advance(2.0)
    for key in ("k18", "k19", "k20", "k21"):  # evicts k08..k11: the disk's oldest make room
        put(service, "c1", key)
    assert [t.key for t in service.drain_tasks() if isinstance(t, DropDiskTask)] == [
        "k03", "k01", "k04", "k05"]  # k01 was read before k04..k07 came
    assert [r.tier for r in service.objects["k01"].replicas] == [Tier.MEMORY]  # copy dropped
    service.check_integrity()


def test_a_full_disk_keeps_copies_being_read() -> None:
    service, clock, seg = disk_service(disk_capacity=4 * OBJ)
    assert finish(service) == keys(4)
    assert service.get_replicas("k00") is ErrorCode.REPLICA_IS_NOT_READY  # promotion queued
    promote = service.drain_tasks()
    clock.advance(0.5)  # k00 still leased and busy
    for key in ("k15", "k16", "k17"):  # the 15th in memory evicts k04..k07
        put(service, "c1", key)
    tasks = service.drain_tasks()
    assert [t.key for t in tasks if isinstance(t, DropDiskTask)] == ["k01", "k02", "k03"]
    assert [t.key for t in tasks if isinstance(t, OffloadTask)] == ["k04", "k05", "k06"]
    assert "k07" not in service.objects  # no room left without k00's copy: deleted
    assert on_disk(service) == ["k00"]
    [task] = promote
    assert isinstance(task, PromoteTask)
    service.promote_done(task, True)
    assert service.get_replicas("k00") == (OBJ, [ReplicaHandle(seg, task.offset)])
    service.check_integrity()


def test_a_put_waiting_for_offloads_on_their_way_evicts_no_more() -> None:
    service, _, _ = disk_service()
    offloads = service.drain_tasks()  # k00..k03, still holding their memory
    put(service, "c1", "k15")  # the last free block
    refused = service.put_start("c1", "k16", OBJ, ReplicateConfig())
    assert refused is ErrorCode.NO_AVAILABLE_HANDLE
    assert service.drain_tasks() == [] and service.counters["evicted"] == 4
    assert isinstance(offloads[0], OffloadTask)
    service.offload_done(offloads[0], True)
    assert start(service, "c1", "k16") == [ReplicaHandle(offloads[0].segment_id, 0)]
    service.check_integrity()


def test_memory_a_reader_leased_during_an_offload_is_not_reused_before_the_lease_ends(
        ) -> None:
    """A get while k00 is copied to disk leases its memory replica; when the copy lands the
    memory is dropped, but kept from the next put until that lease ends (the reader may
    still be copying out of it)."""
    service, clock, seg = disk_service()
    offload = service.drain_tasks()[0]
    assert isinstance(offload, OffloadTask) and offload.offset == 0
    put(service, "c1", "k15")  # the last free block
    assert service.get_replicas("k00") == (OBJ, [ReplicaHandle(seg, 0)])  # leased: 5 s
    service.offload_done(offload, True)
    refused = service.put_start("c1", "k16", OBJ, ReplicateConfig())
    assert refused is ErrorCode.NO_AVAILABLE_HANDLE  # k00's old block is not free yet
    service.check_integrity()
    clock.advance(service.config.lease_ttl_s)
    service.tick()
    assert start(service, "c1", "k16") == [ReplicaHandle(seg, 0)]
    service.check_integrity()


def test_a_forced_remove_keeps_a_leased_objects_memory_until_its_lease_ends() -> None:
    service, clock = make_service()
    seg = mount(service, "c1", "seg")
    put(service, "c1", "k")
    assert service.get_replicas("k") == (OBJ, [ReplicaHandle(seg, 0)])  # a reader's lease
    assert service.remove("k", force=True) is ErrorCode.OK
    stats = service.stats()
    assert (stats.num_keys, stats.used_bytes, stats.retired_bytes) == (0, 0, OBJ)
    assert start(service, "c1", "next") == [ReplicaHandle(seg, OBJ)]  # not the reader's
    clock.advance(service.config.lease_ttl_s)
    assert start(service, "c1", "after") == [ReplicaHandle(seg, 0)]  # no tick needed
    assert service.stats().retired_bytes == 0
    service.check_integrity()


def test_memory_held_for_a_reader_makes_nothing_else_leave() -> None:
    """Held memory comes back once a lease ends: past the watermark only because of it, the
    master evicts nothing."""
    service, _ = eviction_service()
    for key in keys(14):  # 14 of 16 blocks: under the watermark (90 %)
        put(service, "c1", key)
    assert isinstance(service.get_replicas("k13"), tuple)  # a reader's lease
    assert service.remove("k13", force=True) is ErrorCode.OK  # its block held
    put(service, "c1", "k14")  # 15 blocks allocated, 14 of them objects'
    assert service.counters["evicted"] == 0
    assert len(service.objects) == 14
    service.check_integrity()


def test_integrity_holds_while_a_promotion_is_in_flight() -> None:
    service, _, _ = disk_service()
    offload = service.drain_tasks()[0]
    assert isinstance(offload, OffloadTask)
    service.offload_done(offload, True)
    assert service.get_replicas("k00") is ErrorCode.REPLICA_IS_NOT_READY
    service.check_integrity()  # a PROCESSING memory replica next to the disk one is fine


def test_pending_offloads_count_as_freed() -> None:
    """Four offloads in flight already take usage below the watermark: a tick (or another
    put_end) before they report back must not pick four more victims."""
    service, _, _ = disk_service()
    assert len(service.drain_tasks()) == 4
    service.tick()
    assert service.drain_tasks() == []
    assert service.counters["evicted"] == 4
    service.check_integrity()


def test_an_offload_of_a_removed_object_does_not_touch_a_new_put_of_its_key() -> None:
    service, _, seg = disk_service()
    offload = service.drain_tasks()[0]
    assert isinstance(offload, OffloadTask)
    assert service.remove("k00", force=True) is ErrorCode.OK
    handles = put(service, "c1", "k00", OBJ // 2)
    before = snapshot(service)["k00"]
    service.offload_done(offload, True)  # the old k00's file: garbage
    assert snapshot(service)["k00"] == before
    assert service.objects["k00"].busy == 0
    assert service.get_replicas("k00") == (OBJ // 2, handles)
    assert DropDiskTask("k00", seg) in service.drain_tasks()
    assert service.stats().disk_used_bytes == 3 * OBJ  # k01..k03 still on their way; the
    # old k00's reservation is returned, and the new put evicted nothing more
    service.check_integrity()


def test_a_promotion_of_a_removed_object_does_not_touch_a_new_put_of_its_key() -> None:
    service, _, _ = disk_service()
    offload = service.drain_tasks()[0]
    assert isinstance(offload, OffloadTask)
    service.offload_done(offload, True)
    assert service.get_replicas("k00") is ErrorCode.REPLICA_IS_NOT_READY
    promote = service.drain_tasks()[0]
    assert isinstance(promote, PromoteTask)
    assert service.remove("k00", force=True) is ErrorCode.OK
    put(service, "c1", "k00")
    before = snapshot(service)["k00"]
    service.promote_done(promote, True)
    assert snapshot(service)["k00"] == before
    assert service.objects["k00"].busy == 0
    assert service.remove("k00") is ErrorCode.OK  # never read: no lease, nothing in flight
    service.check_integrity()
