"""Arenas and commit rings on the master's side, driven through MasterService with a fake
clock and a ring written here as a client would: records become objects cut from the
arena's front, bad records and gone segments end an arena, and no allocation is lost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvcake.common.errors import ErrorCode
from kvcake.store.commits import CommitRing, CommitWriter
from kvcake.store.locations import LocationReader, LocationTable
from kvcake.store.master.arenas import Arena
from kvcake.store.master.config import MasterConfig, TenantPolicy
from kvcake.store.master.service import MasterService
from kvcake.transfer.segment import SegmentDescriptor, local_host_id
from kvcake.wire.store import ReplicateConfig

SEGMENT = 16 << 20
ARENA = 256 << 10


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def master(tmp_path: Path) -> Iterator[tuple[MasterService, LocationReader, Clock]]:
    clock = Clock()
    config = MasterConfig(seed=1, arena_bytes=ARENA, put_timeout_s=3.0, client_ttl_s=5.0,
                          tenants=(TenantPolicy("capped", quota_bytes=1 << 20),))
    service = MasterService(config, clock)
    table = LocationTable(1024, str(tmp_path))
    service.table.publish(table)
    yield service, LocationReader(table.path), clock
    service.arenas.close()
    table.close()


def _mount(service: MasterService, owner: str, size: int = SEGMENT) -> int:
    service.register_client(owner, local_host_id())
    descriptor = SegmentDescriptor(name=f"seg-{owner}", segment_id=0, size=size,
                                   host_id=local_host_id(), endpoint="127.0.0.1:1",
                                   shm_socket="@kvcake-test", shm_inode=0)
    return service.mount_segment(owner, descriptor)


def _grant(service: MasterService, client_id: str,
           tenant: str = "default") -> tuple[Arena, CommitWriter]:
    granted = service.arenas.grant(client_id, tenant)
    assert not isinstance(granted, ErrorCode), granted
    arena, path = granted
    return Arena(arena.segment_id, arena.cursor, arena.end), CommitWriter(path)


def _client_arena(service: MasterService) -> tuple[Arena, CommitWriter]:
    """A node's segment on this host, and client ``c1``'s arena there."""
    _mount(service, "node")
    service.register_client("c1", local_host_id())
    return _grant(service, "c1")


def _settled(service: MasterService) -> None:
    service.arenas.drain()
    service.table.publish_changed()
    service.check_integrity()


def test_records_become_objects_cut_from_the_front_of_the_arena(
        master: tuple[MasterService, LocationReader, Clock]) -> None:
    service, reader, _ = master
    arena, ring = _client_arena(service)
    assert arena.end - arena.cursor == ARENA
    ring.append([(b"a", arena.cursor, 100), (b"b", arena.cursor + 128, 5000)])
    assert "a" not in service.objects  # read before the next request, not before
    _settled(service)
    a, b = service.objects["a"], service.objects["b"]
    assert a.complete and b.complete and a.owner == "c1"
    assert (a.replicas[0].offset, b.replicas[0].offset) == (arena.cursor, arena.cursor + 128)
    found = reader.find("b")
    assert found is not None and (found.offset, found.size) == (arena.cursor + 128, 5000)
    assert service.counters["arena_puts"] == 2
    ring.append([(b"c", arena.cursor + 128 + 5056, 64)])  # the next record goes on from there
    _settled(service)
    assert service.objects["c"].replicas[0].offset == arena.cursor + 5184


def test_a_key_that_exists_keeps_its_object_and_the_new_bytes_are_freed(
        master: tuple[MasterService, LocationReader, Clock]) -> None:
    service, _, _ = master
    _mount(service, "node")
    service.register_client("c1", local_host_id())
    handles = service.put_start("c1", "k", 64, ReplicateConfig())
    assert isinstance(handles, list) and service.put_end("c1", "k") is ErrorCode.OK
    arena, ring = _grant(service, "c1")
    used = service.stats().used_bytes
    ring.append([(b"k", arena.cursor, 4096)])
    _settled(service)
    assert service.objects["k"].replicas[0].offset == handles[0].offset
    assert service.counters["arena_puts_kept"] == 1
    stats = service.stats()  # the kept record's bytes are free, the rest still the arena's
    assert (stats.used_bytes, stats.arena_bytes) == (used, ARENA - 4096)


def test_a_record_out_of_place_revokes_the_arena_and_its_rest_is_freed_later(
        master: tuple[MasterService, LocationReader, Clock]) -> None:
    service, _, clock = master
    arena, ring = _client_arena(service)
    ring.append([(b"ok", arena.cursor, 64), (b"skips", arena.cursor + 4096, 64)])
    _settled(service)
    assert "ok" in service.objects and "skips" not in service.objects
    assert not ring.usable()  # the client stops writing there
    stats = service.stats()
    assert (stats.used_bytes, stats.retired_bytes) == (64, ARENA - 64)  # the rest: held
    clock.now += 4.0  # past put_timeout_s: a writer mid-copy is done
    service.tick()
    service.check_integrity()
    assert (service.stats().used_bytes, service.stats().retired_bytes) == (64, 0)
    _, again = _grant(service, "c1")
    assert again.usable() and again.path != ring.path


def test_an_unreadable_record_revokes_the_arena(
        master: tuple[MasterService, LocationReader, Clock]) -> None:
    service, _, _ = master
    arena, ring = _client_arena(service)
    ring.append([(b"\xff\xfe", arena.cursor, 64)])  # no UTF-8
    _settled(service)
    assert not ring.usable() and not service.objects


def test_a_second_arena_places_what_the_first_held_and_frees_its_rest(
        master: tuple[MasterService, LocationReader, Clock]) -> None:
    service, _, _ = master
    first, ring = _client_arena(service)
    ring.append([(b"k1", first.cursor, 1000)])
    _, same = _grant(service, "c1")  # the grant reads the ring first
    assert "k1" in service.objects and same.path == ring.path
    service.check_integrity()
    stats = service.stats()
    assert (stats.used_bytes, stats.arena_bytes) == (1024, ARENA)


def test_arenas_only_for_clients_of_this_host_without_a_quota(
        master: tuple[MasterService, LocationReader, Clock]) -> None:
    service, _, _ = master
    _mount(service, "node")
    service.register_client("far", "another-host")
    service.register_client("capped", local_host_id(), tenant="capped")
    assert service.arenas.grant("far", "default") is ErrorCode.UNAVAILABLE_IN_CURRENT_MODE
    assert service.arenas.grant("capped", "capped") is ErrorCode.UNAVAILABLE_IN_CURRENT_MODE
    unpublished = MasterService(MasterConfig(seed=1), Clock())
    _mount(unpublished, "node")
    unpublished.register_client("c1", local_host_id())
    assert unpublished.arenas.grant("c1", "default") is \
        ErrorCode.UNAVAILABLE_IN_CURRENT_MODE


def test_a_dropped_segment_places_its_records_then_ends_its_arenas(
        master: tuple[MasterService, LocationReader, Clock]) -> None:
    service, reader, _ = master
    arena, ring = _client_arena(service)
    ring.append([(b"k", arena.cursor, 64)])
    service.drop_client("node")  # its segment goes, with what was put there
    service.table.publish_changed()
    assert not ring.usable() and "k" not in service.objects and reader.find("k") is None
    service.check_integrity()
    assert service.arenas.grant("c1", "default") is ErrorCode.NO_AVAILABLE_HANDLE


def test_a_silent_client_loses_its_arena(
        master: tuple[MasterService, LocationReader, Clock]) -> None:
    service, _, clock = master
    arena, ring = _client_arena(service)
    ring.append([(b"k", arena.cursor, 64)])
    clock.now += 6.0  # past client_ttl_s (the node's heartbeat keeps it)
    service.heartbeat("node")
    service.tick()
    assert not ring.usable() and "k" not in service.objects  # never read: it was dead
    clock.now += 4.0
    service.tick()
    service.check_integrity()
    assert service.stats().used_bytes == 0


def test_arenas_come_only_from_room_below_the_high_watermark(
        master: tuple[MasterService, LocationReader, Clock]) -> None:
    service, _, clock = master
    _mount(service, "node", size=1 << 20)  # arenas of 64 KiB (a sixteenth)
    service.register_client("c1", local_host_id())
    for i in range(14):  # 896 KiB of 1 MiB: an arena would pass 90 %
        clock.now += 0.01
        assert isinstance(service.put_start("c1", f"k{i}", 64 << 10, ReplicateConfig()), list)
        assert service.put_end("c1", f"k{i}") is ErrorCode.OK
    assert service.arenas.grant("c1", "default") is ErrorCode.NO_AVAILABLE_HANDLE
    assert len(service.objects) == 14  # none left for an arena
    assert service.remove("k0") is ErrorCode.OK
    arena, _ = _grant(service, "c1")
    assert arena.end - arena.cursor == 64 << 10
    service.check_integrity()


def test_a_closing_client_gives_its_arena_back(
        master: tuple[MasterService, LocationReader, Clock]) -> None:
    service, _, _ = master
    arena, ring = _client_arena(service)
    ring.append([(b"k", arena.cursor, 64)])
    service.arenas.release("c1")
    assert "k" in service.objects and not ring.usable()
    stats = service.stats()
    assert (stats.used_bytes, stats.arena_bytes) == (64, 0)
    service.check_integrity()


def test_a_ring_refuses_to_be_a_ring_it_is_not(tmp_path: Path) -> None:
    path = tmp_path / "not-a-ring"
    path.write_bytes(b"x" * 8192)
    with pytest.raises(OSError, match="not a kvcake commit ring"):
        CommitWriter(str(path))
    ring = CommitRing(str(tmp_path / "ring"), 4096)
    writer = CommitWriter(ring.path)
    for round_ in range(40):  # records wrap around the end of the ring
        writer.append([(f"key-{round_}-{i}".encode() * 3, i, round_ + 1) for i in range(3)])
        assert [(c.key, c.size) for c in ring.take()] == \
            [(f"key-{round_}-{i}" * 3, round_ + 1) for i in range(3)]
    assert writer.room() == 4096
    ring.close()
    assert not writer.usable()  # its master closed it


def test_arenas_together_hold_at_most_a_quarter_of_the_pool(
        master: tuple[MasterService, LocationReader, Clock]) -> None:
    service, _, _ = master
    _mount(service, "node", size=2 << 20)  # arenas of 128 KiB, at most 512 KiB in all
    for i in range(5):
        service.register_client(f"c{i}", local_host_id())
    granted = [service.arenas.grant(f"c{i}", "default") for i in range(5)]
    assert [isinstance(g, ErrorCode) for g in granted] == [False] * 4 + [True]
    service.arenas.release("c0")
    assert not isinstance(service.arenas.grant("c4", "default"), ErrorCode)
    service.check_integrity()
