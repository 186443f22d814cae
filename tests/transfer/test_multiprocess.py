"""Peers in other processes: byte-exact traffic both ways, a peer killed or hung mid-batch."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.transfer import BatchState, TransferEngine, TransferOp, TransferRequest
from kvcake.transfer.peer import PeerProcess, pattern

MakeEngine = Callable[..., TransferEngine]
MakePeer = Callable[..., PeerProcess]
MiB = 1 << 20


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_random_data_both_ways_is_byte_exact(
    transport: str, make_engine: MakeEngine, make_peer: MakePeer
) -> None:
    peer = make_peer(size=32 * MiB, fill=5)
    engine = make_engine(transport=transport, connections_per_peer=3)
    remote = engine.open_segment(peer.segment)
    assert remote.transport == transport
    expected = pattern(5, 32 * MiB)
    got = bytearray(32 * MiB)
    engine.read(remote, 0, memoryview(got))  # one 32 MiB read, split over connections
    assert got == expected

    blobs = {offset: os.urandom(size) for offset, size in
             [(0, 1), (4097, 65536), (MiB + 3, 5 * MiB), (32 * MiB - 10, 10)]}
    engine.transfer([TransferRequest(TransferOp.WRITE, remote, off, memoryview(b))
                     for off, b in blobs.items()])
    # Check through the other transport, an independent path into the peer's memory.
    checker = make_engine(transport="tcp" if transport == "shm" else "shm")
    other = checker.open_segment(peer.segment)
    for offset, blob in blobs.items():
        out = bytearray(len(blob))
        checker.read(other, offset, memoryview(out))
        assert out == blob
    untouched = bytearray(100)
    checker.read(other, 2 * MiB + 5 * MiB, memoryview(untouched))
    assert untouched == expected[7 * MiB : 7 * MiB + 100]


def test_peer_killed_mid_batch_fails_the_batch_and_spares_other_peers(
    make_engine: MakeEngine, make_peer: MakePeer
) -> None:
    doomed = make_peer("doomed", size=64 * MiB)
    healthy = make_peer("healthy", size=MiB, fill=9)
    engine = make_engine(transport="tcp", timeout_s=30.0)
    remote = engine.open_segment(doomed.segment)
    buffer = engine.allocate_buffer(64 * MiB).view
    requests = [TransferRequest(TransferOp.READ, remote, i * MiB, buffer[i * MiB:(i + 1) * MiB])
                for i in range(64)]
    engine.transfer(requests[:1])  # connected
    os.kill(doomed.pid, signal.SIGSTOP)  # hold it so the batch is certainly in flight
    batch = engine.submit(requests)
    time.sleep(0.2)
    assert batch.poll() is BatchState.PENDING
    started = time.monotonic()
    doomed.kill()
    with pytest.raises(KvcakeError) as info:
        batch.wait(10)
    assert time.monotonic() - started < 5  # far inside the 30 s timeout: the reset is seen
    assert info.value.code is ErrorCode.TRANSFER_FAIL
    assert batch.poll() is BatchState.FAILED

    other = engine.open_segment(healthy.segment)
    out = bytearray(MiB)
    engine.read(other, 0, memoryview(out))
    assert out == pattern(9, MiB)


def test_hung_peer_times_out_within_the_bound(
    make_engine: MakeEngine, make_peer: MakePeer
) -> None:
    peer = make_peer(size=4 * MiB)
    engine = make_engine(transport="tcp", timeout_s=1.0)
    remote = engine.open_segment(peer.segment)
    engine.write(remote, 0, memoryview(b"before"))
    os.kill(peer.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(KvcakeError, match=r"no answer from peer within 1\.0s"):
            engine.read(remote, 0, memoryview(bytearray(4 * MiB)))
        assert time.monotonic() - started < 3
    finally:
        os.kill(peer.pid, signal.SIGCONT)
    out = bytearray(6)  # the peer woke up: a fresh connection serves again
    engine.read(remote, 0, memoryview(out))
    assert out == b"before"
