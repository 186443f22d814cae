"""Reads over tcp that do not wait for the master first (:mod:`kvcake.store.overlapped`): a
key read before is read again from where it was while the master is asked, and kept only
when the answer names the same object there."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from waiting import is_stopped, stopped, wait_for

from kvcake.common.errors import ErrorCode
from kvcake.ops import ServerProcess, start_master, start_node
from kvcake.store import AsyncStore, ops, overlapped, replica_io
from kvcake.store.config import StoreConfig
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.service import MasterService
from kvcake.store.overlapped import Guess, Sighting, Sightings
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire import store as m

SIZE = 65536


# ----- the rule, without I/O
def _guess(*sightings: Sighting) -> Guess:
    return Guess(m.GetReplicasReply(0.0, [], [], []), list(sightings))


def _found(code: int, size: int, handles: list[m.ReplicaHandle], object_id: int
           ) -> m.GetReplicasReply:
    return m.GetReplicasReply(5.0, [code], [size], [handles], 0.0, [object_id])


def test_a_guess_stands_only_for_the_same_object_on_the_same_replica_within_its_lease(
        ) -> None:
    here, there = m.ReplicaHandle(3, 4096), m.ReplicaHandle(3, 8192)
    guess = _guess(Sighting(77, SIZE, here, until=10.0))
    assert guess.confirmed(_found(0, SIZE, [there, here], 77), read_by=9.0)
    assert not guess.confirmed(_found(0, SIZE, [here], 78), read_by=9.0)  # put again
    assert not guess.confirmed(_found(0, SIZE, [there], 77), read_by=9.0)  # moved
    assert not guess.confirmed(_found(0, SIZE, [here], 77), read_by=10.5)  # read too late
    assert not guess.confirmed(_found(-704, 0, [], 0), read_by=9.0)  # gone
    old_master = m.GetReplicasReply(5.0, [0], [SIZE], [[here]])  # says no object ids
    assert not guess.confirmed(old_master, read_by=9.0)


def test_object_ids_are_not_given_twice_by_two_masters() -> None:
    """A restarted (or new) master counts its ids from elsewhere, so a reader's id from the
    old one does not name a new object."""
    ids = []
    for _ in range(2):
        service = MasterService(MasterConfig(), lambda: 0.0)
        service.register_client("c", "host")
        service.mount_segment("c", SegmentDescriptor(
            name="seg", segment_id=0, size=1 << 20, host_id="host", endpoint="127.0.0.1:1",
            shm_socket="", shm_inode=0))
        assert isinstance(service.put_start("c", "k", SIZE, m.ReplicateConfig()), list)
        assert service.put_end("c", "k") is ErrorCode.OK
        ids.append(service.object_id("k"))
    assert ids[0] and ids[1] and ids[0] != ids[1]


# ----- a real master and node, the reader on tcp
@pytest.fixture
def cluster() -> Iterator[tuple[str, ServerProcess]]:
    """A master's endpoint, and its node."""
    started: list[ServerProcess] = []
    try:
        # leases far longer than any step of a test, on any machine
        master, endpoint = start_master("--lease-ttl", "600")
        started.append(master)
        started.append(start_node(endpoint, "4MiB"))
        yield endpoint, started[-1]
    finally:
        for process in reversed(started):
            process.stop()


def _tcp(endpoint: str) -> AsyncStore:
    return AsyncStore(StoreConfig(master=endpoint), TransferConfig(transport="tcp"))


def _reader(driver: str, store: AsyncStore) -> Callable[[str], Any]:
    """A get of one key, through the asyncio driver or the blocking one (in a thread)."""
    async def read(key: str) -> bytes | int:
        if driver == "async":
            return (await store.get_batch([key]))[0]
        view = memoryview(bytearray(SIZE))
        read = await asyncio.to_thread(store.blocking.run, store.ops.get_into_parts([key],
                                                                                   [[view]]))
        return bytes(view) if read[0] == SIZE else read[0]
    return read


@pytest.mark.parametrize("driver", ["async", "blocking"])
def test_a_value_read_again_is_read_beside_the_question_and_a_changed_one_is_not_kept(
        cluster: tuple[str, ServerProcess], driver: str) -> None:
    store, _ = cluster

    async def scenario() -> None:
        reader, writer = _tcp(store), _tcp(store)
        await reader.setup()
        await writer.setup()
        try:
            read = _reader(driver, reader)
            await writer.put("k", b"1" * SIZE)
            assert await read("k") == b"1" * SIZE  # asks first: nothing seen yet
            sightings = reader.ops.sightings
            assert (sightings.confirmed, sightings.refuted) == (0, 0)
            assert await read("k") == b"1" * SIZE
            assert (sightings.confirmed, sightings.refuted) == (1, 0)

            # the key is put again (elsewhere: its old memory is held for the reader's
            # lease, still holding the old value, which a read there would return)
            await writer.remove("k", force=True)
            await writer.put("k", b"2" * SIZE)
            assert await read("k") == b"2" * SIZE
            assert (sightings.confirmed, sightings.refuted) == (1, 1)
            assert await read("k") == b"2" * SIZE  # where it is now
            assert (sightings.confirmed, sightings.refuted) == (2, 1)
        finally:
            await reader.close()
            await writer.close()

    asyncio.run(scenario())


class Clock:
    """This client's monotonic clock, moved ahead by the test (never behind the real one,
    which other modules read)."""

    def __init__(self) -> None:
        self.ahead_s = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead_s


def test_bytes_read_beside_the_question_after_the_old_lease_are_read_again(
        cluster: tuple[str, ServerProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    """The read beside the question stalls (its node stopped) until the lease of the first
    read has run out on this client's clock: the bytes are not kept, the value is read again
    where the answer says, under its new lease."""
    store, node = cluster
    clock = Clock()
    monkeypatch.setattr(overlapped, "time", clock)
    monkeypatch.setattr(ops, "time", clock)
    monkeypatch.setattr(replica_io, "time", clock)  # the lateness of every read, too
    guessed = threading.Event()
    guess = Sightings.guess

    def noted(self: Sightings, keys: Sequence[str]) -> Guess | None:
        made = guess(self, keys)
        if made is not None:
            guessed.set()
        return made

    monkeypatch.setattr(Sightings, "guess", noted)

    async def scenario() -> tuple[bytes | int, bytes | int, int]:
        reader = _tcp(store)
        await reader.setup()
        try:
            await reader.put("k", b"1" * SIZE)
            first = (await reader.get_batch(["k"]))[0]
            lease_s = reader.ops.sightings._seen["k"].until - clock.monotonic()
            with stopped(node):
                wait_for(lambda: is_stopped(node), 5.0)  # before it is asked
                again = asyncio.ensure_future(reader.get_batch(["k"]))
                assert await asyncio.to_thread(guessed.wait, 10.0)
                clock.ahead_s = lease_s + 1.0  # the read is still on the wire
            return first, (await again)[0], reader.ops.sightings.refuted
        finally:
            await reader.close()

    first, again, refuted = asyncio.run(scenario())
    assert first == again == b"1" * SIZE
    assert refuted == 1
