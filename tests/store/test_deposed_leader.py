"""A leader whose term ends while a call waits (for room, for a promotion) answers nothing
of it: by then a new leader may have handed out the memory the reply would name. The
reply is refused as any call to a deposed leader is, and the client follows the new one.
Its disk tasks, and its "already there" to a writer, wait for the changes they rest on to
reach etcd."""

from __future__ import annotations

import asyncio

import pytest

from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.server import MasterServer
from kvcake.store.master.tiering import DropDiskTask
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire import store as m


class _Election:
    def __init__(self) -> None:
        self.leading = True

    def confirmed(self) -> bool:
        return self.leading


class _Persistence:
    def __init__(self) -> None:
        self.election = _Election()


def test_a_reply_ready_after_the_term_ended_is_refused() -> None:
    server = MasterServer(MasterConfig(port=0, metrics_port=-1))
    persistence = _Persistence()
    server.persistence = persistence  # type: ignore[assignment]
    request = m.Exist(["k"])
    assert server._settle(request) is None  # still leading: the reply leaves
    persistence.election.leading = False  # the term ended while the call waited
    with pytest.raises(KvcakeError) as refused:
        server._settle(request)
    assert refused.value.code is ErrorCode.UNAVAILABLE_IN_CURRENT_MODE


class _Flushing(_Persistence):
    """Durability the test hands out by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes: list[asyncio.Future[None]] = []
        self.unflushed: set[str] = set()

    def pending(self, key: str) -> bool:
        return key in self.unflushed

    def durable(self) -> asyncio.Future[None]:
        self.flushes.append(asyncio.get_running_loop().create_future())
        return self.flushes[-1]


@pytest.mark.parametrize("flushed", [True, False])
def test_a_leaders_disk_tasks_wait_for_the_change_that_queued_them(flushed: bool) -> None:
    """A drop of a disk file runs once the removal is in etcd; never if the term ends
    first (the next leader's table would name a file that is gone)."""
    server = MasterServer(MasterConfig(port=0, metrics_port=-1))
    persistence = _Flushing()
    server.persistence = persistence  # type: ignore[assignment]
    ran: list[object] = []

    async def run_task(task: object) -> None:
        ran.append(task)

    server._run_task = run_task  # type: ignore[method-assign]
    drop = DropDiskTask("k", 1)

    async def scenario() -> None:
        server.service.table.tasks.append(drop)
        server._run_tasks()
        await asyncio.sleep(0)
        assert ran == [] and len(persistence.flushes) == 1
        if flushed:
            persistence.flushes[0].set_result(None)
        else:
            persistence.flushes[0].set_exception(KvcakeError("term over"))
        for _ in range(3):
            await asyncio.sleep(0)

    asyncio.run(scenario())
    assert ran == ([drop] if flushed else [])


def test_a_leaders_already_there_waits_for_the_object_to_be_in_etcd() -> None:
    """A writer takes "already exists" as stored, so an HA leader says it only once the
    object it names is in etcd; a fresh key, or an object flushed already, is answered at
    once."""
    server = MasterServer(MasterConfig(port=0, metrics_port=-1))
    service = server.service
    service.register_client("c", "host-c")
    service.mount_segment("c", SegmentDescriptor(
        name="seg", segment_id=0, size=1 << 20, host_id="host-c", endpoint="127.0.0.1:1",
        shm_socket="", shm_inode=0))
    assert isinstance(service.put_start("c", "k", 64, m.ReplicateConfig()), list)
    assert service.put_end("c", "k") is ErrorCode.OK
    persistence = _Flushing()
    server.persistence = persistence  # type: ignore[assignment]

    async def scenario() -> None:
        fresh = server._put_start(m.PutStart("c", ["new"], [64], m.ReplicateConfig()))
        assert isinstance(fresh, m.PutStartReply) and fresh.codes == [0]
        flushed = server._put_start(m.PutStart("c", ["k"], [64], m.ReplicateConfig()))
        assert isinstance(flushed, m.PutStartReply)
        assert flushed.codes == [ErrorCode.OBJECT_ALREADY_EXISTS] and not persistence.flushes
        persistence.unflushed.add("k")  # the default tenant's key, unscoped
        again = server._put_start(m.PutStart("c", ["k"], [64], m.ReplicateConfig()))
        answer = asyncio.ensure_future(again)
        await asyncio.sleep(0)
        assert not answer.done() and len(persistence.flushes) == 1
        persistence.flushes[0].set_result(None)
        reply = await answer
        assert reply.codes == [ErrorCode.OBJECT_ALREADY_EXISTS]

    asyncio.run(scenario())
