"""A real master in the test process, on a loop thread of its own, called over real sockets
(each call on a connection of its own)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from kvcake.common import codec
from kvcake.common.aio import LoopThread
from kvcake.common.rpc import RpcClient
from kvcake.store.master.config import MasterConfig
from kvcake.store.master.server import MasterServer

TIMEOUT_S = 10.0
T = TypeVar("T")


@dataclass(frozen=True)
class ThreadMaster:
    thread: LoopThread
    server: MasterServer
    endpoint: str

    def start(self, request: Any) -> concurrent.futures.Future[bytes]:
        """``request`` sent; the future of its reply's bytes (a refusal raises from it)."""
        async def once() -> bytes:
            client = RpcClient(self.endpoint, TIMEOUT_S)
            try:
                return await client.call(codec.encode(request))
            finally:
                client.close()
        return asyncio.run_coroutine_threadsafe(once(), self.thread.loop)

    def call(self, request: Any) -> bytes:
        return self.start(request).result(TIMEOUT_S)

    def run(self, action: Callable[[MasterServer], T]) -> T:
        """``action(server)`` on the master's loop (its state is the loop's alone)."""
        async def on_loop() -> T:
            return action(self.server)
        return self.thread.run(on_loop(), TIMEOUT_S)


@contextmanager
def thread_master(name: str) -> Iterator[ThreadMaster]:
    thread = LoopThread(name)
    server = MasterServer(MasterConfig(port=0, metrics_port=-1, summary_s=0.0))
    try:
        yield ThreadMaster(thread, server, thread.run(server.startup(), TIMEOUT_S))
    finally:
        thread.run(server.shutdown(), TIMEOUT_S)
        thread.stop()
