"""A local attacker registers as an instance whose KV region names a victim file, or another
instance's KV cache: the Conductor refuses it with the reason, and nothing is routed to it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from kvcake.common import codec
from kvcake.common.aio import LoopThread
from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.rpc import RpcClient
from kvcake.conductor.config import ConductorConfig, ConductorServerConfig
from kvcake.conductor.server import ConductorServer
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.engine import TransferEngine
from kvcake.transfer.segment import SegmentDescriptor, instance_registrant, local_host_id
from kvcake.wire.conductor import Register, Snapshot
from kvcake.wire.kv import KVRegion

TIMEOUT_S = 5.0
SIZE = 1 << 16


@pytest.fixture
def conductor() -> Iterator[tuple[LoopThread, ConductorServer]]:
    thread = LoopThread("attack-conductor")
    server = ConductorServer(ConductorServerConfig(rpc_port=0), ConductorConfig())
    try:
        thread.run(server.startup(), TIMEOUT_S)
        yield thread, server
    finally:
        thread.run(server.shutdown(), TIMEOUT_S)
        thread.stop()


@pytest.fixture
def victim() -> Iterator[TransferEngine]:
    """A decode instance's KV cache: a segment bound to its instance id."""
    engine = TransferEngine(TransferConfig())
    engine.register_segment("kv-victim", SIZE)
    engine.bind("kv-victim", instance_registrant("victim"))
    yield engine
    engine.close()


def _register(instance_id: str, descriptor: SegmentDescriptor) -> Register:
    region = KVRegion(descriptor, "fp", 1, SIZE // 64, 32, 16)
    return Register(instance_id, "decode", "127.0.0.1:1", "m", "fp", 16, 8, 64, region,
                    Snapshot(0, []))


async def _send(endpoint: str, message: Register) -> KvcakeError | None:
    client = RpcClient(endpoint, TIMEOUT_S)
    try:
        await client.call(codec.encode(message))
    except KvcakeError as exc:
        return exc
    finally:
        client.close()
    return None


def test_forged_kv_regions_are_refused(conductor: tuple[LoopThread, ConductorServer],
                                       victim: TransferEngine, tmp_path: Path) -> None:
    thread, server = conductor
    file = tmp_path / "victim.bin"
    file.write_bytes(os.urandom(SIZE))
    before = hashlib.sha256(file.read_bytes()).hexdigest()
    real = victim.local_descriptor("kv-victim")
    forged = {
        "file": SegmentDescriptor("kv-file", 1, SIZE, local_host_id(), "", str(file),
                                  file.stat().st_ino, os.getpid()),
        "victim's cache": real,
        "victim's cache, renamed": msgspec.structs.replace(real, name="kv-evil"),
    }
    for what, descriptor in forged.items():
        error = thread.run(_send(server.rpc_endpoint, _register("evil", descriptor)),
                           TIMEOUT_S)
        assert error is not None and error.code is ErrorCode.ACCESS_DENIED, what
    error = thread.run(_send(server.rpc_endpoint, _register("evil", real)), TIMEOUT_S)
    assert "did not prove it publishes it as 'instance:evil'" in str(error)
    assert "evil" not in server.instances
    assert hashlib.sha256(file.read_bytes()).hexdigest() == before
    # the owner itself registers: accepted, published under its own id
    assert thread.run(_send(server.rpc_endpoint, _register("victim", real)), TIMEOUT_S) is None
    region = server.instances["victim"].info.kv_region
    assert region is not None
    assert region.descriptor.registrant == instance_registrant("victim")
