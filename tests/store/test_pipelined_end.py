"""A put whose ``PutEnd`` the writer does not wait for (:mod:`kvcake.store.master.ends`): the
master allows it only where asked and without a journal, a read of such a key waits for its
end, and a writer's put is found by another client the moment it returns. A real master
over real sockets."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest

from kvcake.common import codec
from kvcake.common.errors import ErrorCode
from kvcake.ops import ServerProcess, start_master, start_node
from kvcake.store import DistributedStore
from kvcake.store.blocking import _told
from kvcake.store.master.server import MasterServer
from kvcake.store.steps import Tell
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire import store as m
from master_thread import TIMEOUT_S, ThreadMaster, thread_master

T = TypeVar("T")


@pytest.fixture
def master() -> Iterator[ThreadMaster]:
    def setup(server: MasterServer) -> None:
        server.service.register_client("writer", "host-w")
        server.service.register_client("reader", "host-r")
        server.service.mount_segment("writer", SegmentDescriptor(
            "pool", 0, 1 << 20, "host-w", "127.0.0.1:1", "", 0))

    with thread_master("pipelined-end-master") as master:
        master.run(setup)
        yield master


def _call(master: ThreadMaster, request: Any, reply_type: type[T]) -> T:
    return codec.decode(master.call(request), reply_type)


def _handled(master: ThreadMaster, name: str) -> int:
    return master.run(lambda server: server._requests.get(name, 0))


def _start(master: ThreadMaster, key: str, pipeline_end: bool) -> m.PutStartReply:
    reply = _call(master, m.PutStart("writer", [key], [64], pipeline_end=pipeline_end),
                  m.PutStartReply)
    assert reply.codes == [0]
    return reply


def _parked(master: ThreadMaster, request: Any, name: str) -> Any:
    """``request`` sent, handled by the master, and not answered yet."""
    before = _handled(master, name)
    pending = master.start(request)
    deadline = time.monotonic() + TIMEOUT_S
    while _handled(master, name) == before:
        assert time.monotonic() < deadline, f"{name} never reached the master"
        time.sleep(0.005)
    assert not pending.done()
    return pending


def test_a_read_of_a_pipelined_put_waits_for_its_end_and_finds_it(master: ThreadMaster) -> None:
    assert _start(master, "k", pipeline_end=True).pipeline_end
    get = _parked(master, m.GetReplicas(["k"], client_id="reader"), "GetReplicas")
    exist = _parked(master, m.Exist(["k", "other"], client_id="reader"), "Exist")
    query = _parked(master, m.QueryReplicas(["k"], client_id="reader"), "QueryReplicas")
    assert _call(master, m.PutEnd("writer", ["k"]), m.CodesReply).codes == [0]
    found = codec.decode(get.result(TIMEOUT_S), m.GetReplicasReply)
    assert (found.codes, found.sizes) == ([0], [64])
    assert codec.decode(exist.result(TIMEOUT_S), m.CodesReply).codes == [1, 0]
    assert codec.decode(query.result(TIMEOUT_S), m.QueryReplicasReply).sizes == [64]


def test_a_removal_waits_for_the_end_too_and_then_removes(master: ThreadMaster) -> None:
    _start(master, "k", pipeline_end=True)
    remove = _parked(master, m.Remove(["k"], client_id="writer"), "Remove")
    assert _call(master, m.PutEnd("writer", ["k"]), m.CodesReply).codes == [0]
    assert codec.decode(remove.result(TIMEOUT_S), m.CodesReply).codes == [0]
    assert _call(master, m.Exist(["k"], client_id="reader"), m.CodesReply).codes == [0]


def test_a_put_that_does_not_pipeline_is_not_waited_for(master: ThreadMaster) -> None:
    assert not _start(master, "k", pipeline_end=False).pipeline_end
    found = _call(master, m.GetReplicas(["k"], client_id="reader"), m.GetReplicasReply)
    assert found.codes == [ErrorCode.OBJECT_NOT_FOUND]
    assert _call(master, m.Exist(["k"], client_id="reader"), m.CodesReply).codes == [0]


def test_a_revoked_pipelined_put_lets_its_readers_go_finding_nothing(master: ThreadMaster) -> None:
    _start(master, "k", pipeline_end=True)
    get = _parked(master, m.GetReplicas(["k"], client_id="reader"), "GetReplicas")
    assert _call(master, m.PutRevoke("writer", ["k"]), m.CodesReply).codes == [0]
    assert codec.decode(get.result(TIMEOUT_S), m.GetReplicasReply).codes == \
        [ErrorCode.OBJECT_NOT_FOUND]


def test_a_late_refusal_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    step = Tell(m.PutEnd("writer", ["a", "b"]), m.CodesReply)
    with caplog.at_level(logging.WARNING, logger="kvcake"):
        _told(step, codec.encode(m.CodesReply([0, int(ErrorCode.OBJECT_NOT_FOUND)])))
    assert "refused PutEnd of 2 keys (after the call returned): [('b', -704)]" in caplog.text


@pytest.fixture
def cluster() -> Iterator[str]:
    master, endpoint = start_master("--client-ttl", "30")
    node: ServerProcess | None = None
    try:
        node = start_node(endpoint, "32MiB")
        yield endpoint
    finally:
        if node is not None:
            node.stop()
        master.stop()


def _client(endpoint: str) -> DistributedStore:
    store = DistributedStore()
    assert store.setup("127.0.0.1", "p2p", 0, 16 << 20, "tcp", "", endpoint) == 0
    return store


def test_a_put_is_found_by_another_client_as_soon_as_it_returns(cluster: str) -> None:
    writer, reader = _client(cluster), _client(cluster)
    try:
        for i in range(200):
            value = b"%05d" % i * 100
            assert writer.put(f"k{i}", value) == 0
            assert reader.is_exist(f"k{i}") == 1
            assert reader.get(f"k{i}") == value
        assert writer.put("last", b"x") == 0
        assert writer.remove("last") == 0  # its PutEnd was handled first, on that connection
    finally:
        writer.close()
        reader.close()
