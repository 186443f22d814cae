"""A caller that did not register is nobody: over a real socket, its remove and
``remove_all(force)`` are refused whole (ILLEGAL_CLIENT) and delete nothing; a registered
client deletes only its own tenant's objects."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kvcake.common import codec
from kvcake.common.aio import LoopThread
from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.rpc import RpcClient
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.server import MasterServer
from kvcake.store.master.service import MasterService
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire import store as m

TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Master:
    thread: LoopThread
    server: MasterServer
    endpoint: str

    def call(self, request: Any) -> bytes:
        async def once() -> bytes:
            client = RpcClient(self.endpoint, TIMEOUT_S)
            try:
                return await client.call(codec.encode(request))
            finally:
                client.close()
        return self.thread.run(once(), TIMEOUT_S)

    def num_keys(self) -> int:
        async def count() -> int:
            return self.server.service.stats().num_keys
        return self.thread.run(count(), TIMEOUT_S)


def fill(service: MasterService) -> None:
    """``owner`` (default tenant) holds a, b; ``acme-client`` (tenant acme) holds c."""
    service.register_client("owner", "host-owner")
    service.register_client("acme-client", "host-acme", "acme")
    service.mount_segment("owner", SegmentDescriptor("pool", 0, 1 << 20, "host-owner",
                                                     "127.0.0.1:1", "", 0))
    for client_id, key in (("owner", "a"), ("owner", "b"), ("acme-client", "c")):
        assert isinstance(service.put_start(client_id, key, 64, m.ReplicateConfig()), list)
        assert service.put_end(client_id, key) is ErrorCode.OK


@pytest.fixture
def master() -> Iterator[Master]:
    thread = LoopThread("removal-master")
    server = MasterServer(MasterConfig(port=0, metrics_port=-1, summary_s=0.0))
    try:
        endpoint = thread.run(server.startup(), TIMEOUT_S)
        master = Master(thread, server, endpoint)

        async def setup() -> None:
            fill(server.service)
        thread.run(setup(), TIMEOUT_S)
        yield master
    finally:
        thread.run(server.shutdown(), TIMEOUT_S)
        thread.stop()


@pytest.mark.parametrize("request_", [m.RemoveAll(force=True), m.RemoveAll(),
                                      m.Remove(["a", "b"], force=True)],
                         ids=["remove_all_force", "remove_all", "remove"])
def test_a_caller_that_did_not_register_deletes_nothing(master: Master, request_: Any) -> None:
    with pytest.raises(KvcakeError) as caught:
        master.call(request_)
    assert caught.value.code is ErrorCode.ILLEGAL_CLIENT
    assert "need a registered client" in str(caught.value)
    assert master.num_keys() == 3
    reply = codec.decode(master.call(m.Exist(["a", "b"])), m.CodesReply)
    assert reply.codes == [1, 1]  # reads without a client id still read the default tenant


def test_an_unknown_client_id_deletes_nothing(master: Master) -> None:
    with pytest.raises(KvcakeError) as caught:
        master.call(m.RemoveAll(force=True, client_id="ghost"))
    assert "unknown client 'ghost': register first" in str(caught.value)
    assert master.num_keys() == 3


def test_a_registered_client_removes_only_its_own_tenants_objects(master: Master) -> None:
    reply = codec.decode(master.call(m.RemoveAll(force=True, client_id="acme-client")),
                         m.CountReply)
    assert reply.count == 1 and master.num_keys() == 2
    codes = codec.decode(master.call(m.Remove(["a"], client_id="acme-client")),
                         m.CodesReply).codes
    assert codes == [ErrorCode.OBJECT_NOT_FOUND]  # "a" of acme: there is none
    assert codec.decode(master.call(m.RemoveAll(force=True, client_id="owner")),
                        m.CountReply).count == 2
    assert master.num_keys() == 0
