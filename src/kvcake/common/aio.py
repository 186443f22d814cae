"""Event-loop helpers: a process's main loop, a loop on its own thread (for
components with a synchronous API over asyncio I/O), and a server's background tasks."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

from kvcake.common.log import get_logger

T = TypeVar("T")
log = get_logger(__name__)


def run_main(main: Coroutine[Any, Any, None]) -> None:
    """Run a process's main coroutine on a fresh uvloop loop, then close the loop."""
    loop = new_event_loop()
    try:
        loop.run_until_complete(main)
    finally:
        loop.close()


class TaskSet:
    """A server's background tasks, held by strong references until they end (the event
    loop keeps only weak ones: an unreferenced task can vanish mid-await)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task %s failed: %r", task.get_name(), task.exception())

    async def cancel(self, timeout_s: float) -> None:
        """Cancel every task and wait for them, ``timeout_s`` at most (one that overruns is
        left behind, logged: shutting down never hangs)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout_s)
            for task in late:
                log.warning("shutdown: %s did not stop within %gs", task.get_name(), timeout_s)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """kvcake's loop: uvloop (its ``BufferedProtocol`` receives straight into our buffers)."""
    return uvloop.new_event_loop()


class LoopThread:
    """Runs one event loop in a daemon thread until :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self.loop = new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        self.loop.close()

    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop: now if already there, else as soon as it wakes."""
        if self.in_loop_thread():
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and block the calling thread for its result."""
        assert not self.in_loop_thread(), "blocking on the loop from the loop would deadlock"
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Small frames (headers, acks) must not wait for Nagle's algorithm."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
