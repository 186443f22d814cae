"""Transports move a batch's bytes; the engine picks one per peer, by name, from one registry.

=========  ============================================================================
``shm``    same host: map the peer's memfd and copy directly; no server on the data path
``tcp``    any host: frames to the owner's transfer server over several connections
=========  ============================================================================

A new transport (RDMA through UCX, say) subclasses :class:`Transport` and registers its
name; callers never change.
"""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from kvcake.common.aio import LoopThread
from kvcake.common.auth import NO_AUTH, ClusterAuth
from kvcake.common.config import MiB
from kvcake.common.errors import InvalidParamsError, KvcakeError, TransferError
from kvcake.common.log import get_logger
from kvcake.transfer.batch import Batch, BatchState, TransferOp, TransferRequest
from kvcake.transfer.client import Part, PeerClient
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.segment import MappedSegment, SegmentDescriptor, local_host_id

log = get_logger(__name__)

SPLIT_BYTES = 4 * MiB  # transfers larger than this spread over the peer's connections
_SWEEP_S = 0.25


class Transport(ABC):
    """Moves the bytes of some items of a batch, completing each through ``batch.complete``.

    ``start`` must not block on the network: it returns once the work is under way (or done).
    ``auth``: the cluster credentials its connections present (networked transports).
    """

    name: ClassVar[str]

    def __init__(self, config: TransferConfig, io: LoopThread, auth: ClusterAuth = NO_AUTH
                 ) -> None:
        self.config = config
        self.io = io
        self.auth = auth

    @abstractmethod
    def reaches(self, descriptor: SegmentDescriptor) -> bool:
        """Whether this transport can reach that segment from this process."""

    @abstractmethod
    def start(self, batch: Batch, indices: Sequence[int]) -> None:
        """Begin moving ``batch.requests[i]`` for each ``i`` in ``indices``."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and mappings."""


class ShmTransport(Transport):
    """Same-host peers: the copy is a ``memcpy`` between two mappings of the same pages."""

    name = "shm"

    def __init__(self, config: TransferConfig, io: LoopThread, auth: ClusterAuth = NO_AUTH
                 ) -> None:
        super().__init__(config, io, auth)
        self._host_id = config.host_id or local_host_id()
        self._mapped: dict[tuple[str, int, str, int, str], MappedSegment] = {}
        self._mapping_lock = threading.Lock()
        self._last: tuple[SegmentDescriptor, MappedSegment] | None = None  # the last one used

    def reaches(self, descriptor: SegmentDescriptor) -> bool:
        if descriptor.host_id != self._host_id or not descriptor.shm_socket:
            return False
        try:
            self._mapping(descriptor)
        except KvcakeError as exc:
            log.warning("no same-host mapping of segment %r: %s", descriptor.name, exc.args[0])
            return False
        return True

    def mapped(self, descriptor: SegmentDescriptor) -> MappedSegment:
        """The segment's mapping in this process (for callers that copy by themselves)."""
        return self._mapping(descriptor)

    def _mapping(self, descriptor: SegmentDescriptor) -> MappedSegment:
        last = self._last  # one read: a pair another thread sets whole
        if last is not None and last[0] is descriptor:
            return last[1]
        key = _mapping_key(descriptor)
        with self._mapping_lock:  # one mapping per segment, whichever thread maps it
            mapped = self._mapped.get(key)
            if mapped is None:
                mapped = self._mapped[key] = MappedSegment(descriptor, self.auth)
            self._last = (descriptor, mapped)  # never one :meth:`_forget` just dropped
        return mapped

    def start(self, batch: Batch, indices: Sequence[int]) -> None:
        errors = self.copy([batch.requests[index] for index in indices])
        for index, error in zip(indices, errors, strict=True):
            batch.complete(index, error)

    def copy_one(self, request: TransferRequest) -> KvcakeError | None:
        """Run one checked request now, in the calling thread; its error (``None``: moved).
        The single copy without a batch's bookkeeping (:meth:`copy` runs many)."""
        try:
            mapped = self._mapping(request.segment.descriptor)
        except KvcakeError as exc:
            return exc
        _move(mapped, request)
        return None if mapped.owner_alive() else self._forget(mapped)  # as in :meth:`copy`

    def copy(self, requests: Sequence[TransferRequest]) -> list[KvcakeError | None]:
        """Run ``requests`` now, in the calling thread; each one's error (``None``: moved)."""
        errors: list[KvcakeError | None] = [None] * len(requests)
        copied: dict[MappedSegment, list[int]] = {}
        for index, request in enumerate(requests):
            try:
                mapped = self._mapping(request.segment.descriptor)
            except KvcakeError as exc:
                errors[index] = exc
                continue
            _move(mapped, request)
            indices = copied.get(mapped)
            if indices is None:
                copied[mapped] = [index]
            else:
                indices.append(index)
        for mapped, done in copied.items():
            # checked after the copies: bytes in a dead owner's pages are lost with it, and
            # bytes read from them may be torn; never report either as moved
            if not mapped.owner_alive():
                error = self._forget(mapped)
                for index in done:
                    errors[index] = error
        return errors

    def _forget(self, mapped: MappedSegment) -> TransferError:
        """Drop a dead owner's mapping; the error its transfers fail with."""
        with self._mapping_lock:
            self._last = None
            self._mapped.pop(_mapping_key(mapped.descriptor), None)
        mapped.close()
        return TransferError(f"the owner of segment {mapped.descriptor.name!r} (pid "
                             f"{mapped.descriptor.owner_pid}) exited; its memory is gone")

    def close(self) -> None:
        for mapped in self._mapped.values():
            mapped.close()
        self._mapped.clear()
        self._last = None


class TcpTransport(Transport):
    """Any peer with a reachable transfer server; bounded by ``config.timeout_s``."""

    name = "tcp"

    def __init__(self, config: TransferConfig, io: LoopThread, auth: ClusterAuth = NO_AUTH
                 ) -> None:
        super().__init__(config, io, auth)
        self._peers: dict[str, PeerClient] = {}
        self._deadlines: dict[Batch, float] = {}  # batches in flight, loop thread only
        self._sweeping = False

    def reaches(self, descriptor: SegmentDescriptor) -> bool:
        return bool(descriptor.endpoint)

    def start(self, batch: Batch, indices: Sequence[int]) -> None:
        self.io.call(self._start_on_loop, batch, list(indices))

    def _start_on_loop(self, batch: Batch, indices: list[int]) -> None:
        by_peer: dict[str, list[Part]] = {}
        for index in indices:
            request = batch.requests[index]
            parts = by_peer.setdefault(request.segment.descriptor.endpoint, [])
            parts.extend(self._split(batch, index))
        self._deadlines[batch] = time.monotonic() + self.config.timeout_s
        self._ensure_sweeping()
        for endpoint, parts in by_peer.items():
            self._peer(endpoint).submit(parts)

    def _split(self, batch: Batch, index: int) -> list[Part]:
        request = batch.requests[index]
        segment_id = request.segment.descriptor.segment_id
        count = min(self.config.connections_per_peer, math.ceil(request.length / SPLIT_BYTES))
        if count <= 1:
            return [Part(batch, index, request.op, segment_id, request.offset, request.buffer,
                         request.grant)]
        batch.split(index, count)
        step = math.ceil(request.length / count)
        return [
            Part(batch, index, request.op, segment_id, request.offset + start,
                 request.buffer[start : start + step], request.grant)
            for start in range(0, request.length, step)
        ]

    def _peer(self, endpoint: str) -> PeerClient:
        peer = self._peers.get(endpoint)
        if peer is None:
            peer = self._peers[endpoint] = PeerClient(
                endpoint,
                self.config.connections_per_peer,
                self.config.max_frame_bytes,
                spread_bytes=SPLIT_BYTES // 2,
                auth=self.auth,
                timeout_s=self.config.timeout_s,
            )
        return peer

    def _ensure_sweeping(self) -> None:
        if not self._sweeping:
            self._sweeping = True
            self.io.loop.call_later(_SWEEP_S, self._sweep)

    def _sweep(self) -> None:
        """Fail batches past their deadline; forget finished ones."""
        now = time.monotonic()
        for batch, deadline in list(self._deadlines.items()):
            if batch.poll() is not BatchState.PENDING:
                del self._deadlines[batch]
            elif now >= deadline:
                del self._deadlines[batch]
                self._expire(batch)
        self._sweeping = False
        if self._deadlines:
            self._ensure_sweeping()

    def _expire(self, batch: Batch) -> None:
        error = TransferError(
            f"no answer from peer within {self.config.timeout_s}s; connection dropped"
        )
        for peer in self._peers.values():
            peer.fail_batch(batch, error)
        for index, request in enumerate(batch.requests):  # parts not sent yet (still connecting)
            if request.segment.transport == self.name:
                batch.complete(index, error)

    def close(self) -> None:
        self.io.call(self._close_on_loop)

    def _close_on_loop(self) -> None:
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()


def _move(mapped: MappedSegment, request: TransferRequest) -> None:
    """Copy ``request``'s bytes between its buffer and ``mapped``."""
    start, buffer = request.offset, request.buffer
    if request.op is TransferOp.READ:
        buffer[:] = mapped.view[start : start + buffer.nbytes]
    else:
        mapped.view[start : start + buffer.nbytes] = buffer


def _mapping_key(descriptor: SegmentDescriptor) -> tuple[str, int, str, int, str]:
    return (descriptor.shm_socket, descriptor.owner_pid, descriptor.name, descriptor.shm_inode,
            descriptor.registrant)


TRANSPORTS: dict[str, type[Transport]] = {
    ShmTransport.name: ShmTransport,
    TcpTransport.name: TcpTransport,
}


def transport_class(name: str) -> type[Transport]:
    try:
        return TRANSPORTS[name]
    except KeyError:
        raise InvalidParamsError(
            f"unknown transport {name!r}; known: {', '.join(sorted(TRANSPORTS))}"
        ) from None
