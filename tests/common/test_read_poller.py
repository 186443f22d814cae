"""A server that polls its connections after each read: it answers as one that sleeps, polls
only while requests come fast, and keeps its set of sockets right as connections come and
go (their descriptors are reused)."""

from __future__ import annotations

import asyncio

from kvcake.common.aio import LoopThread
from kvcake.common.auth import NO_AUTH
from kvcake.common.blocking_rpc import BlockingRpcClient
from kvcake.common.rpc import RpcServer
from kvcake.common.stream import ReadPoller


def _reverse(payload: memoryview) -> bytes:
    return bytes(payload)[::-1]


def test_a_polling_server_answers_every_call_and_forgets_closed_connections() -> None:
    thread = LoopThread("test-polling-server")
    server = RpcServer(_reverse, "127.0.0.1", 0, NO_AUTH, poll_s=0.01)  # polls all along
    endpoint = thread.run(server.startup())
    poller = server.poller
    assert poller is not None
    try:
        for round_ in range(3):
            clients = [BlockingRpcClient(endpoint, 5.0, NO_AUTH) for _ in range(4)]
            for i in range(100):
                client = clients[i % 4]
                assert client.call(b"%d-%d" % (round_, i)) == (b"%d-%d" % (round_, i))[::-1]
            assert thread.run(_count(poller)) == 4
            for client in clients:
                client.close()
            assert thread.run(_until_empty(poller)) == 0
    finally:
        thread.run(server.shutdown())
        thread.stop()


async def _count(poller: ReadPoller) -> int:
    return len(poller)


async def _until_empty(poller: ReadPoller) -> int:
    for _ in range(200):
        if not len(poller):
            break
        await asyncio.sleep(0.01)
    return len(poller)


def test_polling_starts_with_fast_reads_and_stops_when_they_slow_down() -> None:
    now = [0.0]
    poller = ReadPoller(100e-6, clock=lambda: now[0])

    async def reads(gap_s: float, count: int) -> bool:
        for _ in range(count):
            now[0] += gap_s
            poller.after_read()
            await asyncio.sleep(0)  # its poll, if scheduled, runs (no connection: up to 100 µs)
        return poller.polling

    try:
        assert not asyncio.run(reads(0.01, 5))  # 10 ms apart: sleep between them
        assert asyncio.run(reads(20e-6, 60))  # 20 µs apart: poll
        assert not asyncio.run(reads(0.005, 3))  # a slow spell stops it within a few reads
    finally:
        poller.close()
