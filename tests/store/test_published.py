"""What the master publishes in its location table, driven through MasterService with a
fake clock: only complete objects, where they lie in memory, and never a slot that still
names memory the service has freed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvcake.common import codec
from kvcake.common.errors import ErrorCode
from kvcake.store.locations import NO_SEGMENT, LocationReader, LocationTable
from kvcake.store.master import server as master_server
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.service import MasterService
from kvcake.store.master.tiering import OffloadTask, PromoteTask
from kvcake.transfer.segment import SegmentDescriptor, local_host_id
from kvcake.wire import store as m
from kvcake.wire.store import ReplicateConfig
from master_thread import thread_master

OBJ = 4096
SEGMENT = 16 * OBJ


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def published(tmp_path: Path) -> Iterator[tuple[MasterService, LocationReader, Clock]]:
    clock = Clock()
    service = MasterService(MasterConfig(seed=1, lease_ttl_s=1.0, high_watermark=0.9,
                                         evict_ratio=0.25), clock)
    table = LocationTable(64, str(tmp_path))
    service.table.publish(table)
    yield service, LocationReader(table.path), clock
    table.close()


def _mount(service: MasterService, client_id: str, here: bool = True, **kwargs: Any) -> int:
    host_id = local_host_id() if here else "another-host"
    service.register_client(client_id, host_id)
    descriptor = SegmentDescriptor(name=f"seg-{client_id}", segment_id=0, size=SEGMENT,
                                   host_id=host_id, endpoint="127.0.0.1:1",
                                   shm_socket="@kvcake-test" if here else "", shm_inode=0)
    return service.mount_segment(client_id, descriptor, **kwargs)


def _put(service: MasterService, client_id: str, key: str, end: bool = True,
         upsert: bool = False, **config: Any) -> None:
    handles = service.put_start(client_id, key, OBJ, ReplicateConfig(**config), upsert=upsert)
    assert isinstance(handles, list), handles
    if end:
        assert service.put_end(client_id, key) is ErrorCode.OK
    service.table.publish_changed()  # as the server does before each reply


def _where(reader: LocationReader, key: str) -> tuple[int, int] | None:
    found = reader.find(key)
    return None if found is None else (found.segment_id, found.offset)


def test_only_ended_puts_are_published_and_a_removal_drops_them(
        published: tuple[MasterService, LocationReader, Clock]) -> None:
    service, reader, clock = published
    here = _mount(service, "c1")
    _put(service, "c1", "open", end=False)
    assert reader.find("open") is None  # a read of it asks the master, which waits
    _put(service, "c1", "k")
    handle = service.objects["k"].replicas[0]
    assert _where(reader, "k") == (here, handle.offset)
    found = reader.find("k")
    clock.now += 2.0  # past the put's lease
    assert service.remove("k") is ErrorCode.OK
    assert reader.find("k") is None and found is not None and not reader.unchanged(found)


def test_an_upsert_drops_the_old_slot_at_its_start_and_publishes_the_new_at_its_end(
        published: tuple[MasterService, LocationReader, Clock]) -> None:
    service, reader, _ = published
    _mount(service, "c1")
    _put(service, "c1", "k")
    old = reader.find("k")
    _put(service, "c1", "k", end=False, upsert=True)
    assert reader.find("k") is None
    assert service.put_end("c1", "k") is ErrorCode.OK
    service.table.publish_changed()
    replica = service.objects["k"].replicas[0]
    assert _where(reader, "k") == (replica.segment_id, replica.offset)
    assert old is not None and not reader.unchanged(old)  # its memory may be reused


def test_objects_on_other_hosts_are_published_for_exist_checks_only(
        published: tuple[MasterService, LocationReader, Clock]) -> None:
    service, reader, _ = published
    _mount(service, "far", here=False)
    _put(service, "far", "k")
    found = reader.find("k")
    assert found is not None and found.segment_id == NO_SEGMENT and found.size == OBJ


def test_a_dropped_segment_takes_its_objects_out(
        published: tuple[MasterService, LocationReader, Clock]) -> None:
    service, reader, _ = published
    _mount(service, "c1")
    _put(service, "c1", "k")
    service.drop_client("c1")
    assert reader.find("k") is None


def test_evicted_offloaded_and_promoted_objects_follow_their_memory(
        published: tuple[MasterService, LocationReader, Clock]) -> None:
    service, reader, clock = published
    segment = _mount(service, "c1", disk_capacity=1 << 20, control_endpoint="127.0.0.1:2")
    keys = [f"k{i:02}" for i in range(15)]
    for key in keys:
        clock.now += 0.01
        _put(service, "c1", key)
    offloads = [t for t in service.drain_tasks() if isinstance(t, OffloadTask)]
    assert offloads and _where(reader, offloads[0].key) == (segment, offloads[0].offset)
    service.offload_done(offloads[0], True)  # memory freed: on disk only
    service.table.publish_changed()
    on_disk = reader.find(offloads[0].key)
    assert on_disk is not None and not on_disk.mapped_here
    clock.now += 2.0
    assert service.get_replicas(offloads[0].key) is ErrorCode.REPLICA_IS_NOT_READY
    [promote] = service.drain_tasks()
    assert isinstance(promote, PromoteTask)
    service.promote_done(promote, True)
    service.table.publish_changed()
    assert _where(reader, promote.key) == (segment, promote.offset)


def test_a_master_without_shared_memory_serves_and_names_no_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_room(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(master_server, "LocationTable", no_room)
    with thread_master("test-no-table") as master:
        reply = codec.decode(master.call(m.RegisterClient("c1", local_host_id())),
                             m.RegisterReply)
        assert reply.locations == "" and reply.lease_ttl_s > 0


def test_a_master_with_a_cluster_token_publishes_no_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes of the master's user could write the file; with a token they are not
    trusted that far (docs/security.md)."""
    monkeypatch.setenv("KVCAKE_CLUSTER_TOKEN", "t0ken-" + "e" * 26)
    with thread_master("test-token-no-table") as master:
        reply = codec.decode(master.call(m.RegisterClient("c1", local_host_id())),
                             m.RegisterReply)
        assert reply.locations == ""
