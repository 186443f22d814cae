"""Confinement: with a cluster token a node serves a client only the replicas the master
granted it. A client that holds the token but bends the protocol is refused."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from kvcake.common.errors import ErrorCode
from kvcake.common.frames import FrameOp, pack_header
from kvcake.ops import ServerProcess, start_master, start_node
from kvcake.store import AsyncStore
from kvcake.store.config import StoreConfig
from kvcake.store.master.grants import ReplicaGrants
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.grants import Grant, GrantMode, new_grant_key, open_grant
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire import store as m
from wire import authenticated_socket, grant_frame, recv_frame

TOKEN = "grant-store-token-" + "h" * 20
NOW = 1_700_000_000.0


# ----- the master's signer, without I/O
def test_handles_on_keyed_segments_carry_a_grant_for_exactly_their_bytes() -> None:
    key = new_grant_key()
    grants = ReplicaGrants(clock=lambda: NOW)
    grants.learn(7, "pool@node", key)
    signed = grants.sign([m.ReplicaHandle(7, 4096), m.ReplicaHandle(8, 0)], 1000,
                         GrantMode.READ, 5.0)
    assert signed[1] == m.ReplicaHandle(8, 0)  # a node without a token: a plain handle
    grant = open_grant(signed[0].grant, {"pool@node": key}, NOW)
    assert (grant.offset, grant.length, grant.count, grant.mode) == (4096, 1000, 1,
                                                                     GrantMode.READ)
    assert grant.expires_ms == (NOW + 5.0) * 1000
    grants.forget(7)
    assert grants.sign([m.ReplicaHandle(7, 0)], 10, GrantMode.READ, 5.0) == [
        m.ReplicaHandle(7, 0)]


def test_handles_without_grants_decode_as_before() -> None:
    old = msgspec.msgpack.encode([5, 64])  # a two-field handle, as sent without a token
    assert msgspec.msgpack.decode(old, type=m.ReplicaHandle) == m.ReplicaHandle(5, 64)


# ----- a real master and node
@pytest.fixture
def secured_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    path = tmp_path / "cluster.token"
    path.write_text(TOKEN)
    path.chmod(0o600)
    monkeypatch.setenv("KVCAKE_CLUSTER_TOKEN", TOKEN)  # this process: the client
    started: list[ServerProcess] = []
    try:
        master, endpoint = start_master("--cluster-token-file", str(path))
        started.append(master)
        started.append(start_node(endpoint, "4MiB", "--cluster-token-file", str(path)))
        yield endpoint
    finally:
        for process in reversed(started):
            process.stop()


async def _leases(endpoint: str, values: dict[str, bytes]
                  ) -> tuple[m.GetReplicasReply, SegmentDescriptor]:
    """Put ``values``, then what the master tells a reader of them (handles and grants)."""
    store = AsyncStore(StoreConfig(master=endpoint), TransferConfig(transport="tcp"))
    await store.setup()
    try:
        assert await store.put_batch(list(values), list(values.values())) == [0] * len(values)
        assert store.session is not None
        found = await store.session.call(m.GetReplicas(list(values)), m.GetReplicasReply)
        segment_id = found.replicas[0][0].segment_id
        described = await store.session.call(m.DescribeSegments([segment_id]),
                                             m.DescribeSegmentsReply)
        descriptor = described.descriptors[0]
        assert descriptor is not None
        return found, descriptor
    finally:
        await store.close()


async def _get(endpoint: str, keys: list[str]) -> list[bytes | int]:
    store = AsyncStore(StoreConfig(master=endpoint), TransferConfig(transport="tcp"))
    await store.setup()
    try:
        return await store.get_batch(keys)
    finally:
        await store.close()




def _widened(blob: bytes, length: int) -> bytes:
    grant = msgspec.msgpack.decode(blob, type=Grant)
    return msgspec.msgpack.encode(msgspec.structs.replace(grant, length=length))


def test_a_client_cannot_read_or_write_outside_the_replicas_it_was_granted(
        secured_store: str) -> None:
    values = {"mine": b"M" * 1000, "theirs": b"T" * 1000}
    found, descriptor = asyncio.run(_leases(secured_store, values))
    mine, theirs = found.replicas[0][0], found.replicas[1][0]
    assert mine.grant and theirs.grant
    sid = descriptor.segment_id
    with authenticated_socket(descriptor.endpoint, TOKEN) as sock:
        sock.sendall(
            grant_frame(mine.grant)
            + pack_header(FrameOp.READ, 1, sid, mine.offset, 1000)          # granted
            + pack_header(FrameOp.READ, 2, sid, theirs.offset, 1000)        # not granted
            + pack_header(FrameOp.WRITE, 3, sid, mine.offset, 1000) + b"x" * 1000  # READ only
            + pack_header(FrameOp.WRITE, 4, sid, theirs.offset, 10) + b"y" * 10
            + grant_frame(_widened(mine.grant, 1 << 20))                         # forged
            + pack_header(FrameOp.READ, 5, sid, mine.offset, 1 << 20))
        answers = [recv_frame(sock) for _ in range(5)]
    assert [(h.request_id, h.status) for h, _ in answers] == [
        (1, 0), (2, ErrorCode.ACCESS_DENIED), (3, ErrorCode.ACCESS_DENIED),
        (4, ErrorCode.ACCESS_DENIED), (5, ErrorCode.ACCESS_DENIED)]
    assert answers[0][1] == values["mine"]
    assert b"last grant refused" in answers[4][1] and b"bad signature" in answers[4][1]
    assert asyncio.run(_get(secured_store, list(values))) == list(values.values())


def test_a_put_s_write_grant_does_not_reach_past_its_replica(secured_store: str) -> None:
    values = {"first": b"1" * 4096, "second": b"2" * 4096}
    found, descriptor = asyncio.run(_leases(secured_store, values))
    first, second = found.replicas[0][0], found.replicas[1][0]
    read_grant = msgspec.msgpack.decode(first.grant, type=Grant)
    assert read_grant.mode == GrantMode.READ  # a reader never holds a write grant
    with authenticated_socket(descriptor.endpoint, TOKEN) as sock:
        sock.sendall(grant_frame(first.grant) + pack_header(
            FrameOp.WRITE, 9, descriptor.segment_id, second.offset, 4096) + b"!" * 4096)
        header, message = recv_frame(sock)
    assert (header.request_id, header.status) == (9, ErrorCode.ACCESS_DENIED)
    assert b"WRITE of" in message
    assert asyncio.run(_get(secured_store, list(values))) == list(values.values())
