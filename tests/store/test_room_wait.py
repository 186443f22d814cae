"""A put refused for room while an offload is on its way waits for it (up to 8 s), and is
tried again once memory is back, even when the offload lands before the wait starts. A real
master on a loop thread, driven on that loop so that the landing falls in that gap."""

from __future__ import annotations

from collections.abc import Awaitable

from kvcake.common.errors import ErrorCode
from kvcake.store.master.server import MasterServer
from kvcake.store.master.tiering import OffloadTask
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire import store as m
from master_thread import thread_master

VALUE = 256 << 10


def _fill(server: MasterServer) -> None:
    """A 1 MiB segment with a disk tier, full of complete values."""
    service = server.service
    service.register_client("w", "host-w")
    service.mount_segment("w", SegmentDescriptor("pool", 0, 1 << 20, "host-w", "127.0.0.1:1",
                                                 "", 0), 4 << 20, "127.0.0.1:1")
    for i in range(4):
        assert isinstance(service.put_start("w", f"k{i}", VALUE, m.ReplicateConfig()), list)
        assert service.put_end("w", f"k{i}") == ErrorCode.OK


async def _put_as_its_offload_lands(server: MasterServer) -> list[int]:
    """A full memory refuses ``new`` and starts an offload; it lands before the handler's
    wait begins (its memory is free, nothing is on its way any more)."""
    _fill(server)
    answer = server._put_start(m.PutStart("w", ["new"], [VALUE]))
    assert isinstance(answer, Awaitable)  # refused for now: it waits for room
    tasks = [t for t in server.service.drain_tasks() if isinstance(t, OffloadTask)]
    assert tasks
    for task in tasks:
        server.service.offload_done(task, True)
    assert not server.service.tiering.offloading
    reply = await answer
    return list(reply.codes)


def test_a_put_is_tried_again_when_its_offload_lands_before_it_waits() -> None:
    with thread_master("room-wait-master") as master:
        codes = master.thread.run(_put_as_its_offload_lands(master.server), 10.0)
    assert codes == [0]
