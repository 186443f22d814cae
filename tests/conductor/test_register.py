"""An instance id belongs to one live instance: a second Register under it, over a real
socket, is refused with a clear error and the first keeps its handle and its requests; once
the first is silent past ``instance_ttl_s`` the id is free for a restarted instance."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvcake.common import codec
from kvcake.common.aio import LoopThread
from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.rpc import RpcClient
from kvcake.conductor.config import ConductorConfig, ConductorServerConfig
from kvcake.conductor.server import ConductorServer
from kvcake.wire.conductor import InstanceLoad, Register, Report, ReportReply, Snapshot

TIMEOUT_S = 5.0
TTL_S = 3.0
IDLE = InstanceLoad(0, 0, 0, 0, 0, 0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.thread = LoopThread("register-test")
        self.server = ConductorServer(ConductorServerConfig(rpc_port=0, instance_ttl_s=TTL_S),
                                      ConductorConfig(), self.clock)
        self.endpoint = self.thread.run(self.server.startup(), TIMEOUT_S)

    def call(self, message: Register | Report) -> bytes:
        async def once() -> bytes:
            client = RpcClient(self.endpoint, TIMEOUT_S)
            try:
                return await client.call(codec.encode(message))
            finally:
                client.close()
        return self.thread.run(once(), TIMEOUT_S)

    def endpoint_of(self, instance_id: str) -> str:
        async def read() -> str:
            return self.server.instances[instance_id].info.endpoint
        return self.thread.run(read(), TIMEOUT_S)

    def close(self) -> None:
        self.thread.run(self.server.shutdown(), TIMEOUT_S)
        self.thread.stop()


@pytest.fixture
def conductor() -> Iterator[Harness]:
    harness = Harness()
    try:
        yield harness
    finally:
        harness.close()


def register(instance_id: str, endpoint: str) -> Register:
    return Register(instance_id, "both", endpoint, "m", "fp", 16, 8, 64, None, Snapshot(0, []))


def test_a_second_register_of_a_live_id_is_refused(conductor: Harness) -> None:
    conductor.call(register("d1", "127.0.0.1:1111"))
    conductor.clock.now += TTL_S / 2
    assert codec.decode(conductor.call(Report("d1", IDLE)), ReportReply).known
    conductor.clock.now += TTL_S / 2  # 1.5 s after its last report: alive
    with pytest.raises(KvcakeError) as caught:
        conductor.call(register("d1", "127.0.0.1:6666"))
    assert caught.value.code is ErrorCode.OBJECT_ALREADY_EXISTS
    assert "instance id 'd1' belongs to a live instance at 127.0.0.1:1111" in str(caught.value)
    assert conductor.endpoint_of("d1") == "127.0.0.1:1111"
    assert codec.decode(conductor.call(Report("d1", IDLE)), ReportReply).known


def test_once_the_first_is_silent_past_its_ttl_the_id_is_free(conductor: Harness) -> None:
    conductor.call(register("d1", "127.0.0.1:1111"))
    conductor.clock.now += TTL_S + 0.5  # silent: dead, whether or not the sweep ran yet
    conductor.call(register("d1", "127.0.0.1:2222"))
    assert conductor.endpoint_of("d1") == "127.0.0.1:2222"
    assert codec.decode(conductor.call(Report("d1", IDLE)), ReportReply).known
