"""Transfer requests and the batch that tracks their completion.

A :class:`Batch` is completed from whichever thread moves the bytes (the caller's for
``shm``, the engine's I/O thread for ``tcp``) and waited on from any thread or event loop.
An item may be split into parts (a big transfer spread over several connections); it is
done when its last part is.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any

from kvcake.common.errors import KvcakeError, TransferError
from kvcake.transfer.segment import SegmentDescriptor


class TransferOp(IntEnum):
    READ = 1  # remote segment -> local buffer
    WRITE = 2  # local buffer -> remote segment


class BatchState(Enum):
    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class RemoteSegment:
    """A peer's segment as this engine reaches it: its descriptor and the chosen transport."""

    descriptor: SegmentDescriptor
    transport: str

    @property
    def name(self) -> str:
        return self.descriptor.name

    @property
    def size(self) -> int:
        return self.descriptor.size


@dataclass(frozen=True)
class MappedRange:
    """A same-host segment's bytes mapped into this process: read ``view`` in place, then
    trust what was read only while ``owner_alive()`` (a dead owner's pages may be torn)."""

    view: memoryview
    owner_alive: Callable[[], bool]


@dataclass(frozen=True)
class TransferRequest:
    """Move ``len(buffer)`` bytes between ``buffer`` and ``segment[offset:]``.

    ``grant``: the segment owner's grant covering the range (opaque; see
    :mod:`kvcake.transfer.grants`), needed by owners that run with a cluster token.
    """

    op: TransferOp
    segment: RemoteSegment
    offset: int
    buffer: memoryview
    grant: bytes = b""

    @property
    def length(self) -> int:
        return self.buffer.nbytes


@dataclass(eq=False)
class Batch:
    """Completion state of a submitted batch; see :meth:`wait`, :meth:`poll`, ``await``."""

    requests: Sequence[TransferRequest]
    errors: list[KvcakeError | None] = field(init=False)
    _parts: list[int] = field(init=False)
    _remaining: int = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _done: threading.Event = field(init=False, default_factory=threading.Event)
    _callbacks: list[Callable[[], None]] = field(init=False, default_factory=list)
    submitted_s: float = field(init=False, default_factory=time.monotonic)
    finished_s: float | None = field(init=False, default=None)  # when the last item ended

    def __post_init__(self) -> None:
        self.errors = [None] * len(self.requests)
        self._parts = [1] * len(self.requests)
        self._remaining = len(self.requests)
        if not self.requests:
            self.finished_s = self.submitted_s
            self._done.set()

    def split(self, index: int, parts: int) -> None:
        """Item ``index`` will complete through ``parts`` calls of :meth:`complete`."""
        assert parts >= 1
        with self._lock:
            self._parts[index] = parts

    def complete(self, index: int, error: KvcakeError | None = None) -> None:
        """One part of item ``index`` finished (failed when ``error`` is given)."""
        with self._lock:
            if self._parts[index] == 0:
                return  # already failed and finished
            if error is not None and self.errors[index] is None:
                self.errors[index] = error
            self._parts[index] = 0 if error is not None else self._parts[index] - 1
            if self._parts[index]:
                return
            self._remaining -= 1
            if self._remaining:
                return
            callbacks, self._callbacks = self._callbacks, []
            self.finished_s = time.monotonic()
            self._done.set()
        for callback in callbacks:
            callback()

    def poll(self) -> BatchState:
        if not self._done.is_set():
            return BatchState.PENDING
        return BatchState.FAILED if self.first_error() else BatchState.COMPLETED

    def first_error(self) -> KvcakeError | None:
        return next((e for e in self.errors if e is not None), None)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every item finished; raise the first failure.

        ``timeout`` bounds this wait only (the engine's own ``timeout_s`` bounds the batch).
        """
        if not self._done.wait(timeout):
            raise TransferError(f"batch of {len(self.requests)} still pending after {timeout}s")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        raise_first(self.errors)

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (from the completing thread) once the batch is done."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def __await__(self) -> Generator[Any, None, None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(_resolve, future)

        self.add_done_callback(wake)
        yield from future.__await__()
        self._raise_if_failed()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def raise_first(errors: Sequence[KvcakeError | None]) -> None:
    """Raise the first failure of a batch's ``errors`` (saying how many failed), if any."""
    for error in errors:
        if error is not None:
            break
    else:
        return
    failed = sum(e is not None for e in errors)
    if failed == 1:
        raise error
    raise type(error)(f"{failed}/{len(errors)} transfers failed; first: {error.args[0]}",
                      error.code)
