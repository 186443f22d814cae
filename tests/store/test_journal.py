"""The failover journal without etcd: what a leader writes for its changes, and a new leader
restored from those records (exact replicas, allocations, pins; memory held until durable)."""

from __future__ import annotations

from typing import Any

import pytest

from kvcake.common import codec
from kvcake.common.errors import ErrorCode, InvalidParamsError
from kvcake.store.master.allocator import SegmentAllocator
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.journal import (
    ChangeSet,
    Layout,
    ObjectRecord,
    SegmentRecord,
    restore,
    writes_for,
)
from kvcake.store.master.replica import Tier
from kvcake.store.master.service import MasterService
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire.store import ReplicaHandle, ReplicateConfig

KIB = 1 << 10
LAYOUT = Layout("/test/")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def leader(**fields: Any) -> tuple[MasterService, Clock]:
    clock = Clock()
    service = MasterService(MasterConfig(seed=7, **fields), clock)
    service.changes = ChangeSet()
    return service, clock


def mount(service: MasterService, client_id: str, name: str, size: int = 64 * KIB) -> int:
    service.register_client(client_id, f"host-{client_id}")
    return service.mount_segment(client_id, SegmentDescriptor(
        name=name, segment_id=0, size=size, host_id=f"host-{client_id}",
        endpoint="127.0.0.1:1", shm_socket="", shm_inode=0))


def put(service: MasterService, client_id: str, key: str, size: int,
        **config: Any) -> list[ReplicaHandle]:
    if client_id not in service.registry.clients:
        service.register_client(client_id, f"host-{client_id}")
    handles = service.put_start(client_id, key, size, ReplicateConfig(**config))
    assert isinstance(handles, list)
    assert service.put_end(client_id, key) is ErrorCode.OK
    return handles


class FakeEtcd:
    """A dict standing in for etcd, applying a leader's flushes in order."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.order: list[str] = []  # keys by last write, oldest first

    def flush(self, service: MasterService) -> None:
        assert service.changes is not None
        changes, service.changes = service.changes, ChangeSet()
        for key, value in writes_for(service, changes, LAYOUT):
            self.data.pop(key, None)
            if key in self.order:
                self.order.remove(key)
            if value is not None:
                self.data[key] = value
                self.order.append(key)
        service.release_frees(changes.frees)

    def restore_into(self, service: MasterService) -> None:
        segments = [codec.decode(v, SegmentRecord) for k, v in self.data.items()
                    if k.startswith(LAYOUT.segments)]
        objects = [(k.removeprefix(LAYOUT.objects), codec.decode(self.data[k], ObjectRecord))
                   for k in self.order if k.startswith(LAYOUT.objects)]
        restore(service, segments, objects)


def replicas(service: MasterService, key: str) -> list[tuple[int, int, str]]:
    return sorted((r.segment_id, r.offset, r.tier.value) for r in service.objects[key].readable())


def test_a_new_leader_has_the_same_objects_replicas_and_free_space() -> None:
    old, clock = leader()
    a, b = mount(old, "node-a", "seg-a"), mount(old, "node-b", "seg-b")
    put(old, "writer", "two", 10 * KIB, replica_num=2)
    put(old, "writer", "pinned", 4 * KIB, with_hard_pin=True)
    put(old, "writer", "soft", 4 * KIB, with_soft_pin=True, soft_pin_ttl_s=50)
    old.register_client("late", "host-late")
    open_put = old.put_start("late", "open", 4 * KIB, ReplicateConfig())
    assert isinstance(open_put, list)
    etcd = FakeEtcd()
    etcd.flush(old)
    assert sorted(etcd.data) == sorted([
        LAYOUT.segment_key(a), LAYOUT.segment_key(b), LAYOUT.object_key("two"),
        LAYOUT.object_key("pinned"), LAYOUT.object_key("soft")])  # the open put is not there

    clock.now += 10
    new = MasterService(MasterConfig(seed=8), clock)
    etcd.restore_into(new)
    assert sorted(new.objects) == ["pinned", "soft", "two"]
    for key in new.objects:
        assert replicas(new, key) == replicas(old, key)
    assert {r[0] for r in replicas(new, "two")} == {a, b}
    assert new.objects["pinned"].hard_pinned
    assert new.objects["soft"].soft_pin_until == pytest.approx(clock.now + 50)
    assert new.objects["two"].owner == "writer"
    assert sorted(new.registry.clients) == ["node-a", "node-b"]
    assert new.registry.clients["node-a"].segment_ids == {a}
    assert new.memory_usage()[0] == old.memory_usage()[0] - 4 * KIB  # less the open put
    new.check_integrity()
    # the new leader allocates around the restored objects
    fresh = put(new, "writer", "fresh", 4 * KIB)
    taken = {(r[0], r[1]) for key in ("two", "pinned", "soft") for r in replicas(new, key)}
    assert (fresh[0].segment_id, fresh[0].offset) not in taken
    assert new.put_end("writer", "two") is ErrorCode.OK  # a retried end of a persisted put
    new.check_integrity()


def test_removed_memory_is_reused_only_after_the_removal_is_durable() -> None:
    service, _ = leader()
    segment = mount(service, "node", "seg", size=16 * KIB)
    first = put(service, "w", "first", 8 * KIB)
    etcd = FakeEtcd()
    etcd.flush(service)
    assert service.remove("first") is ErrorCode.OK
    assert service.changes is not None and service.changes.frees == [(segment, 0)]
    # until the flush, the bytes of "first" stay: no put can be placed over them
    assert service.put_start("w", "second", 12 * KIB, ReplicateConfig()) is \
        ErrorCode.NO_AVAILABLE_HANDLE
    service.check_integrity()
    etcd.flush(service)
    assert LAYOUT.object_key("first") not in etcd.data
    assert put(service, "w", "second", 12 * KIB) == first
    service.check_integrity()


def test_eviction_and_a_dead_node_are_journaled() -> None:
    service, _ = leader(high_watermark=0.4, evict_ratio=0.2)
    a = mount(service, "node-a", "seg-a", size=16 * KIB)
    mount(service, "node-b", "seg-b", size=16 * KIB)
    for i in range(3):
        put(service, "w", f"k{i}", 4 * KIB, preferred_segment="seg-a")
    etcd = FakeEtcd()
    etcd.flush(service)
    put(service, "w", "k3", 4 * KIB, preferred_segment="seg-a")  # past the watermark
    evicted = {f"k{i}" for i in range(4)} - set(service.objects)
    assert evicted
    etcd.flush(service)
    assert all(LAYOUT.object_key(k) not in etcd.data for k in evicted)
    service.drop_client("node-a")
    etcd.flush(service)
    assert LAYOUT.segment_key(a) not in etcd.data
    assert not [k for k in etcd.data if k.startswith(LAYOUT.objects)]
    restored = MasterService(MasterConfig(seed=9), Clock())
    etcd.restore_into(restored)
    assert not restored.objects
    assert list(restored.registry.clients) == ["node-b"]
    restored.check_integrity()


def test_replicas_on_segments_without_a_record_are_dropped() -> None:
    service, _ = leader()
    mount(service, "node-a", "seg-a")
    b = mount(service, "node-b", "seg-b")
    put(service, "w", "both", 4 * KIB, replica_num=2)
    put(service, "w", "only-b", 4 * KIB, preferred_segment="seg-b")
    etcd = FakeEtcd()
    etcd.flush(service)
    del etcd.data[LAYOUT.segment_key(b)]
    restored = MasterService(MasterConfig(seed=9), Clock())
    etcd.restore_into(restored)
    assert sorted(restored.objects) == ["both"]
    assert all(r.segment_id != b for r in restored.objects["both"].replicas)
    restored.check_integrity()


def test_disk_replicas_are_restored_with_their_disk_usage() -> None:
    service, _ = leader(high_watermark=0.3, evict_ratio=0.2)
    segment = service.mount_segment  # mount a node with a disk tier
    service.register_client("node", "host-node")
    seg = segment("node", SegmentDescriptor(
        name="seg", segment_id=0, size=16 * KIB, host_id="host-node", endpoint="127.0.0.1:1",
        shm_socket="", shm_inode=0), disk_capacity=64 * KIB, control_endpoint="127.0.0.1:2")
    put(service, "w", "cold", 4 * KIB)
    put(service, "w", "hot", 4 * KIB)
    for task in service.drain_tasks():
        service.offload_done(task, True)  # type: ignore[arg-type]
    on_disk = [k for k, o in service.objects.items() if o.readable(Tier.DISK)]
    assert on_disk
    etcd = FakeEtcd()
    etcd.flush(service)
    restored = MasterService(MasterConfig(seed=9), Clock())
    etcd.restore_into(restored)
    for key in on_disk:
        assert [r.tier for r in restored.objects[key].replicas] == [Tier.DISK]
    assert restored.registry.segments[seg].disk_used == service.registry.segments[seg].disk_used
    restored.check_integrity()


def test_allocator_rebuilt_from_allocations() -> None:
    allocator = SegmentAllocator.with_allocations(64 * KIB, [(8 * KIB, 100), (0, 4 * KIB)])
    allocator.check_integrity()
    assert allocator.num_allocations == 2
    assert allocator.used_bytes == 4 * KIB + 128
    assert allocator.allocate(4 * KIB) == 4 * KIB  # the gap between them
    with pytest.raises(InvalidParamsError, match="overlaps"):
        SegmentAllocator.with_allocations(64 * KIB, [(0, 4 * KIB), (64, 64)])
    with pytest.raises(InvalidParamsError, match="outside"):
        SegmentAllocator.with_allocations(64 * KIB, [(60 * KIB, 8 * KIB)])


def test_restored_objects_count_as_leased_for_one_lease() -> None:
    """A reader the old leader leased may still be copying out: the new leader neither
    removes nor evicts what it restored before such a lease could have ended."""
    old, clock = leader(lease_ttl_s=5.0)
    mount(old, "node-a", "seg-a")
    put(old, "writer", "k", 4 * KIB)
    etcd = FakeEtcd()
    etcd.flush(old)
    new = MasterService(MasterConfig(seed=8, lease_ttl_s=5.0), clock)
    etcd.restore_into(new)
    assert new.remove("k") is ErrorCode.OBJECT_HAS_LEASE
    clock.now += 5.1
    assert new.remove("k") is ErrorCode.OK
