"""The master's location table on its own: what a reader finds, and when it must not trust
what it read (a slot rewritten meanwhile, a master gone)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from kvcake.common.errors import KvcakeError
from kvcake.store.locations import (
    NO_SEGMENT,
    LocationReader,
    LocationTable,
    key_hash,
    remove_orphans,
)


@pytest.fixture
def table(tmp_path: Path) -> Iterator[LocationTable]:
    table = LocationTable(64, str(tmp_path))
    yield table
    table.close()


def _same_first_slot(slots: int, count: int) -> list[str]:
    """``count`` keys whose probe runs start at the same slot of a table of ``slots``."""
    by_slot: dict[int, list[str]] = {}
    for i in range(10_000):
        key = f"key-{i}"
        keys = by_slot.setdefault(int.from_bytes(key_hash(key)[:8], "little") % slots, [])
        keys.append(key)
        if len(keys) == count:
            return keys
    raise AssertionError("no colliding keys")


def test_a_published_key_is_found_where_it_lies_and_a_dropped_one_is_not(
        table: LocationTable) -> None:
    reader = LocationReader(table.path)
    table.publish("k", 3, 4096, 100)
    found = reader.find("k")
    assert found is not None and (found.segment_id, found.offset, found.size) == (3, 4096, 100)
    assert found.mapped_here and reader.unchanged(found)
    assert reader.find("other") is None
    table.drop("k")
    assert reader.find("k") is None and not reader.unchanged(found)
    table.publish("disk-only", NO_SEGMENT, 0, 7)
    on_disk = reader.find("disk-only")
    assert on_disk is not None and not on_disk.mapped_here and on_disk.size == 7
    assert len(table) == 1


def test_republishing_a_key_moves_it_and_invalidates_what_was_read(
        table: LocationTable) -> None:
    reader = LocationReader(table.path)
    table.publish("k", 1, 0, 10)
    before = reader.find("k")
    table.publish("k", 2, 64, 10)
    after = reader.find("k")
    assert before is not None and after is not None
    assert (after.segment_id, after.offset) == (2, 64) and after.slot == before.slot
    assert not reader.unchanged(before) and reader.unchanged(after)


def test_colliding_keys_probe_past_dropped_slots_and_reuse_them(tmp_path: Path) -> None:
    table = LocationTable(64, str(tmp_path))
    try:
        reader = LocationReader(table.path)
        a, b, c = _same_first_slot(64, 3)
        table.publish(a, 1, 0, 1)
        table.publish(b, 1, 64, 1)
        found_a = reader.find(a)
        table.drop(a)
        found_b = reader.find(b)
        assert found_b is not None and found_b.offset == 64  # past a's dropped slot
        table.publish(c, 1, 128, 1)
        found_c = reader.find(c)
        assert found_a is not None and found_c is not None and found_c.slot == found_a.slot
    finally:
        table.close()


def test_a_full_probe_run_leaves_the_key_out_and_readers_ask_the_master(
        tmp_path: Path) -> None:
    table = LocationTable(2, str(tmp_path))
    try:
        reader = LocationReader(table.path)
        for i, key in enumerate(["a", "b", "c"]):
            table.publish(key, 1, i, 1)
        assert table.unplaced == 1 and len(table) == 2
        assert sum(reader.find(key) is not None for key in ["a", "b", "c"]) == 2
    finally:
        table.close()


def test_slot_counts_must_be_powers_of_two(tmp_path: Path) -> None:
    with pytest.raises(KvcakeError, match="power of two"):
        LocationTable(48, str(tmp_path))


def test_a_file_that_is_no_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kvcake-locations-fake"
    path.write_bytes(b"not a table" * 1000)
    with pytest.raises(OSError, match="not a kvcake location table"):
        LocationReader(str(path))


def test_readers_see_a_closed_table_s_master_gone(table: LocationTable) -> None:
    reader = LocationReader(table.path)
    assert reader.alive()
    table.close()
    assert not reader.alive()


def _publish_and_die(directory: str, pipe: Connection) -> None:
    table = LocationTable(64, directory)
    table.publish("k", 1, 0, 1)
    pipe.send(table.path)
    os._exit(0)  # no close: as a killed master


def test_a_dead_master_s_table_is_not_trusted_and_the_next_master_removes_it(
        tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    child = context.Process(target=_publish_and_die, args=(str(tmp_path), theirs))
    child.start()
    assert ours.poll(30)
    path = ours.recv()
    child.join(30)
    reader = LocationReader(path)
    assert reader.find("k") is not None and not reader.alive()
    live = LocationTable(64, str(tmp_path))  # cleans up behind the dead one
    try:
        assert not os.path.exists(path) and os.path.exists(live.path)
        remove_orphans(str(tmp_path))
        assert os.path.exists(live.path)  # a live master's table stays
    finally:
        live.close()


def _flip(pipe: Connection, directory: str, seconds: float) -> None:
    table = LocationTable(64, directory)
    pipe.send(table.path)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        table.publish("k", 1, 100, 10)
        table.publish("k", 2, 200, 20)
        table.drop("k")
    table.close()


def test_a_reader_racing_a_writer_never_trusts_a_mix_of_two_locations(tmp_path: Path) -> None:
    """A writer process rewrites one slot as fast as it can; every location the reader
    finds and still finds unchanged afterwards is one the writer wrote whole."""
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    writer = context.Process(target=_flip, args=(theirs, str(tmp_path), 1.5))
    writer.start()
    assert ours.poll(30)
    reader = LocationReader(ours.recv())
    seen = {(1, 100, 10): 0, (2, 200, 20): 0}
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        found = reader.find("k")
        if found is not None and reader.unchanged(found):
            fields = (found.segment_id, found.offset, found.size)
            assert fields in seen, fields
            seen[fields] += 1
    writer.join(30)
    assert all(seen.values()), seen


@pytest.fixture
def small_shm(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of its own (needs root and ``mount``)."""
    directory = tmp_path / "shm"
    directory.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(directory)],
            check=False, capture_output=True).returncode != 0:
        pytest.skip("needs root and mount for a tmpfs of its own")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_a_full_shared_memory_refuses_a_table_with_an_error_not_a_crash(
        small_shm: Path) -> None:
    with pytest.raises(OSError):
        LocationTable(1 << 15, str(small_shm))  # 2 MiB of slots in 1 MiB
    assert not list(small_shm.iterdir())  # nothing half made is left
    table = LocationTable(1 << 10, str(small_shm))  # 64 KiB: fits
    table.close()
