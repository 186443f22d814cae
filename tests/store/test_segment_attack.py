"""A local attacker mounts forged segments through the master: a descriptor naming a victim
file, and ones naming a live node's segment. Each mount is refused with the reason, and no
byte of the victim changes while real clients put and get through shm."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from kvcake.common import codec
from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.rpc import RpcClient
from kvcake.ops import ServerProcess, start_master, start_node
from kvcake.store import AsyncStore
from kvcake.store.config import StoreConfig
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.segment import SegmentDescriptor, local_host_id
from kvcake.wire import store as m

SIZE = 1 << 20
ATTACKER = "attacker-1"


@pytest.fixture
def store() -> Iterator[tuple[str, ServerProcess]]:
    master, endpoint = start_master()
    try:
        node = start_node(endpoint, "16MiB")
        try:
            yield endpoint, node
        finally:
            node.stop()
    finally:
        master.stop()


@pytest.fixture
def victim_file(tmp_path: Path) -> Path:
    path = tmp_path / "victim.bin"
    path.write_bytes(random.Random(7).randbytes(SIZE))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _call(rpc: RpcClient, request: msgspec.Struct, reply: type[msgspec.Struct]) -> object:
    return codec.decode(await rpc.call(codec.encode(request)), reply)


async def _node_descriptor(rpc: RpcClient) -> SegmentDescriptor:
    """The live node's descriptor, as any client learns it (a put's handle, then Describe)."""
    started = await _call(rpc, m.PutStart(ATTACKER, ["probe"], [64]), m.PutStartReply)
    assert isinstance(started, m.PutStartReply) and started.codes == [0]
    await _call(rpc, m.PutRevoke(ATTACKER, ["probe"]), m.CodesReply)
    segment_id = started.replicas[0][0].segment_id
    described = await _call(rpc, m.DescribeSegments([segment_id]), m.DescribeSegmentsReply)
    assert isinstance(described, m.DescribeSegmentsReply)
    descriptor = described.descriptors[0]
    assert descriptor is not None and descriptor.shm_socket
    return descriptor


def _forgeries(node: SegmentDescriptor, victim: Path) -> dict[str, SegmentDescriptor]:
    inode = victim.stat().st_ino
    file = SegmentDescriptor("evil-file", 1, SIZE, local_host_id(), "", str(victim), inode,
                             os.getpid())
    return {
        "victim file as the socket": file,
        "victim file via /proc": msgspec.structs.replace(
            file, name="evil-proc", shm_socket=f"/proc/{os.getpid()}/fd/0"),
        "the node's segment, renamed": msgspec.structs.replace(node, name="evil-alias"),
        "the node's segment, same name": node,
        "the node's socket, another pid": msgspec.structs.replace(
            node, name="evil-pid", owner_pid=os.getpid()),
    }


async def _attack(endpoint: str, victim: Path) -> dict[str, KvcakeError]:
    rpc = RpcClient(endpoint, 5.0)
    try:
        await _call(rpc, m.RegisterClient(ATTACKER, local_host_id()), m.RegisterReply)
        node = await _node_descriptor(rpc)
        refusals = {}
        for what, forged in _forgeries(node, victim).items():
            with pytest.raises(KvcakeError) as info:
                await _call(rpc, m.MountSegment(ATTACKER, forged), m.MountReply)
            refusals[what] = info.value
        return refusals
    finally:
        rpc.close()


async def _traffic(endpoint: str, count: int) -> None:
    """A real client over shm: every object back byte for byte."""
    store = AsyncStore(StoreConfig(master=endpoint), TransferConfig(transport="shm"))
    await store.setup()
    try:
        values = {f"k{i}": random.Random(i).randbytes(4096 + i) for i in range(count)}
        for key, value in values.items():
            await store.put(key, value)
        for key, value in values.items():
            assert await store.get(key) == value
    finally:
        await store.close()


def test_forged_mounts_are_refused_and_the_victim_is_untouched(
        store: tuple[str, ServerProcess], victim_file: Path) -> None:
    endpoint, _ = store
    before = _digest(victim_file)
    refusals = asyncio.run(_attack(endpoint, victim_file))
    for what in ("victim file as the socket", "victim file via /proc"):
        assert refusals[what].code is ErrorCode.ACCESS_DENIED, what
        assert "not a kvcake segment socket" in str(refusals[what]), what
    assert refusals["the node's segment, renamed"].code is ErrorCode.ACCESS_DENIED
    assert "did not prove it publishes it as 'store:attacker-1'" in str(
        refusals["the node's segment, renamed"])
    assert refusals["the node's segment, same name"].code is ErrorCode.ACCESS_DENIED
    assert "not by the segment's owner pid" in str(refusals["the node's socket, another pid"])
    asyncio.run(_traffic(endpoint, 40))
    assert _digest(victim_file) == before


def test_a_node_killed_with_9_takes_no_more_acknowledged_puts(
        store: tuple[str, ServerProcess]) -> None:
    endpoint, node = store
    asyncio.run(_put_after_kill(endpoint, node))


async def _put_after_kill(endpoint: str, node: ServerProcess) -> None:
    store = AsyncStore(StoreConfig(master=endpoint), TransferConfig(transport="shm"))
    await store.setup()
    try:
        await store.put("before", b"x" * 4096)
        os.kill(node.pid, 9)
        node.kill()  # reaped: the master's pidfd of it is readable now
        with pytest.raises(KvcakeError):
            await store.put("after", b"y" * 4096)
        assert not await store.is_exist("after")
        assert not await store.is_exist("before")  # its only replica went with the node
    finally:
        await store.close()
