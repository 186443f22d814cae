"""The transfer engine: register memory, find peers' segments, move bytes in batches.

::

    engine = TransferEngine(TransferConfig())          # starts its I/O thread and server
    local = engine.allocate_buffer(1 << 20)            # a registered, pre-touched segment
    remote = engine.open_segment("127.0.0.1:7000/kv0") # p2p handshake; shm or tcp chosen
    engine.read(remote, offset=0, buffer=local.view)   # sync
    await engine.awrite(remote, 0, local.view)         # asyncio
    batch = engine.submit([TransferRequest(...), ...]); batch.wait()

Every check happens before a byte moves: an unknown segment, a range outside it, or a
read into a read-only buffer raises at once and nothing is transferred.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from types import TracebackType

from kvcake.common.aio import LoopThread
from kvcake.common.auth import ClusterAuth, cluster_auth
from kvcake.common.blocking_rpc import PerThread
from kvcake.common.errors import InvalidParamsError, KvcakeError
from kvcake.common.log import get_logger
from kvcake.transfer.batch import (
    Batch,
    MappedRange,
    RemoteSegment,
    TransferOp,
    TransferRequest,
    raise_first,
)
from kvcake.transfer.blocking_peer import BlockingPeer
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.grants import GrantMode
from kvcake.transfer.handover import HandoverServer, forbid_same_user_access
from kvcake.transfer.metadata import MetadataDirectory, make_directory
from kvcake.transfer.segment import Segment, SegmentDescriptor, local_host_id
from kvcake.transfer.server import TransferServer
from kvcake.transfer.service import SegmentTable, check_range
from kvcake.transfer.transports import SPLIT_BYTES, ShmTransport, Transport, transport_class

log = get_logger(__name__)
_buffer_names = itertools.count()


class TransferEngine:
    """One per process: owns its segments, its server, and its connections to peers.

    ``auth``: cluster credentials (default: the process's). With a token, the server serves
    authenticated connections only, and this engine authenticates every connection it opens.
    """

    def __init__(
        self, config: TransferConfig | None = None, directory: MetadataDirectory | None = None,
        auth: ClusterAuth | None = None,
    ) -> None:
        self.config = config or TransferConfig()
        self.auth = auth if auth is not None else cluster_auth()
        self.host_id = self.config.host_id or local_host_id()
        self._table = SegmentTable(self.host_id, require_grants=self.auth.enabled)
        self._io = LoopThread("kvcake-transfer-io")
        self._server = TransferServer(
            self._table, self.config.host, self.config.port, self.config.max_frame_bytes,
            self.auth,
        )
        try:
            self.endpoint = self._io.run(self._server.startup(), self.config.timeout_s)
        except BaseException:
            self._io.stop()
            raise
        self._table.endpoint = self.endpoint
        self._handover = HandoverServer(self._table.hand_over, self.auth)
        if self.auth.enabled:  # with a token, the handover is the only way to our memory
            forbid_same_user_access()
        self._table.shm_socket = self._handover.name
        self.directory = directory or make_directory(self.config.metadata, self.config.timeout_s,
                                                     self.auth)
        self._transports: dict[str, Transport] = {}
        self._here = PerThread(lambda endpoint: BlockingPeer(
            endpoint, self.auth, self.config.timeout_s, self.config.reply_spin_us / 1e6))
        self._closed = False

    @property
    def io(self) -> LoopThread:
        """The engine's I/O loop thread. Callers with no loop of their own (the store's sync
        client) may run their coroutines on it and save a thread hop per call; they must
        never block it."""
        return self._io

    # ----- local memory
    def register_segment(self, name: str, size: int) -> Segment:
        """Allocate (and pre-touch) a segment peers can read and write, and publish it."""
        segment = Segment(name, self._table.next_segment_id(), size, self.config.pretouch)
        try:
            self._table.add(segment)
        except KvcakeError:
            segment.close()
            raise
        self.directory.publish(self._table.descriptor(name))
        return segment

    def allocate_buffer(self, size: int) -> Segment:
        """A registered local buffer (Mooncake's managed buffer) with a generated name."""
        return self.register_segment(f"buffer-{next(_buffer_names)}", size)

    def unregister_segment(self, name: str) -> None:
        self.directory.unpublish(name)
        self._table.remove(name).close()

    def local_descriptor(self, name: str, registrant: str = "") -> SegmentDescriptor:
        """Our segment's descriptor as ``registrant`` publishes it (see :meth:`bind`)."""
        return self._table.descriptor(name, registrant)

    def bind(self, name: str, registrant: str) -> None:
        """Let ``registrant`` (``store:<client>``, ``instance:<id>``) publish our segment
        ``name``: same-host peers are handed its memfd only for a registrant it is bound to."""
        self._table.bind(name, registrant)

    # ----- grants (with a cluster token, peers read and write our segments only inside them)
    def grant_key(self, name: str) -> bytes:
        """Our segment's grant key, for the one party we let sign for it (a store node's
        master); ``b""`` without a cluster token."""
        return self._table.grant_keys.get(name, b"")

    def sign_grant(self, name: str, offset: int, length: int, mode: GrantMode, ttl_s: float,
                   stride: int = 0, count: int = 1) -> bytes:
        """A grant on our segment ``name`` for ``ttl_s`` seconds (``b""`` without a token)."""
        return self._table.sign(name, offset, length, mode, time.time() + ttl_s, stride, count)

    # ----- peers
    def open_segment(self, name: str) -> RemoteSegment:
        """Look a segment up and choose the transport that reaches it."""
        return self.attach(self.directory.lookup(name))

    async def aopen_segment(self, name: str) -> RemoteSegment:
        return await asyncio.to_thread(self.open_segment, name)

    def attach(self, descriptor: SegmentDescriptor) -> RemoteSegment:
        """Reach a segment whose descriptor came by other means (e.g. a store's master)."""
        names = ("shm", "tcp") if self.config.transport == "auto" else (self.config.transport,)
        for name in names:
            if self._transport(name).reaches(descriptor):
                return RemoteSegment(descriptor, name)
        raise InvalidParamsError(
            f"segment {descriptor.name!r} at {descriptor.endpoint or 'no endpoint'} is not "
            f"reachable with transport {self.config.transport!r}"
        )

    def _transport(self, name: str) -> Transport:
        transport = self._transports.get(name)
        if transport is None:
            transport = self._transports[name] = transport_class(name)(
                self.config, self._io, self.auth)
        return transport

    def map_range(self, segment: RemoteSegment, offset: int, length: int) -> MappedRange | None:
        """``segment[offset:offset + length]`` as this process's own memory, no copy, where
        the segment is reached through a same-host mapping (``None`` otherwise)."""
        if segment.transport != "shm" or offset < 0 or offset + length > segment.size:
            return None
        transport = self._transport("shm")
        assert isinstance(transport, ShmTransport)
        mapped = transport.mapped(segment.descriptor)
        return MappedRange(mapped.view[offset:offset + length], mapped.owner_alive)

    # ----- transfers
    def submit(self, requests: Sequence[TransferRequest]) -> Batch:
        """Check every request, then start them all; returns at once with the batch."""
        self._check_open()
        for request in requests:
            _check_request(request)
        batch = Batch(requests)
        by_transport: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_transport.setdefault(request.segment.transport, []).append(index)
        for name in sorted(by_transport, key=lambda n: n == "shm"):  # network first, then copy
            self._transport(name).start(batch, by_transport[name])
        return batch

    def copy(self, requests: Sequence[TransferRequest]) -> list[KvcakeError | None] | None:
        """Run ``requests`` now, in the calling thread, when every one is a same-host copy
        (no batch, no I/O thread): each one's error (``None``: moved). ``None`` when some
        request crosses the network (nothing moved then: :meth:`submit` them)."""
        self._check_open()
        for request in requests:
            if request.segment.transport != "shm":
                return None
        for request in requests:
            _check_request(request)
        return self._shm().copy(requests)

    def _shm(self) -> ShmTransport:
        transport = self._transports.get("shm") or self._transport("shm")
        assert isinstance(transport, ShmTransport)
        return transport

    def transfer_here(self, requests: Sequence[TransferRequest]
                      ) -> list[KvcakeError | None] | None:
        """Run ``requests`` to their end in the calling thread when that is the fast way:
        same-host copies (as :meth:`copy`), or network transfers of less than
        ``SPLIT_BYTES`` in all, each peer's on a blocking connection of this thread's own
        (larger ones go faster spread over the I/O thread's connections). Each request's
        error (``None``: moved); ``None`` when the batch is not for here (nothing moved:
        :meth:`submit` it). Never from the engine's own I/O thread."""
        done = self.copy(requests)
        if done is not None or self._io.in_loop_thread():
            return done
        if any(r.segment.transport != "tcp" for r in requests) \
                or sum(r.length for r in requests) >= SPLIT_BYTES:
            return None
        for request in requests:
            _check_request(request)
        errors: list[KvcakeError | None] = [None] * len(requests)
        by_peer: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_peer.setdefault(request.segment.descriptor.endpoint, []).append(index)
        for endpoint, indices in by_peer.items():
            moved = self._here.get(endpoint).move([requests[i] for i in indices])
            for index, error in zip(indices, moved, strict=True):
                errors[index] = error
        return errors

    def transfer(self, requests: Sequence[TransferRequest]) -> None:
        """Move ``requests`` and wait; raises the first failure. Where
        :meth:`transfer_here` takes the batch (same-host copies, small network batches, from
        a thread other than the engine's), it runs in the calling thread."""
        if len(requests) == 1 and requests[0].segment.transport == "shm":
            self._check_open()
            _check_request(requests[0])
            error = self._shm().copy_one(requests[0])
            if error is not None:
                raise error
            return
        errors = self.transfer_here(requests)
        if errors is None:
            self.submit(requests).wait()
            return
        raise_first(errors)

    async def atransfer(self, requests: Sequence[TransferRequest]) -> None:
        await self.submit(requests)

    def read(self, segment: RemoteSegment, offset: int, buffer: memoryview) -> None:
        self.transfer([TransferRequest(TransferOp.READ, segment, offset, buffer)])

    def write(self, segment: RemoteSegment, offset: int, buffer: memoryview) -> None:
        self.transfer([TransferRequest(TransferOp.WRITE, segment, offset, buffer)])

    async def aread(self, segment: RemoteSegment, offset: int, buffer: memoryview) -> None:
        await self.atransfer([TransferRequest(TransferOp.READ, segment, offset, buffer)])

    async def awrite(self, segment: RemoteSegment, offset: int, buffer: memoryview) -> None:
        await self.atransfer([TransferRequest(TransferOp.WRITE, segment, offset, buffer)])

    # ----- lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise KvcakeError("transfer engine is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for transport in self._transports.values():
            transport.close()
        self._here.close()
        try:
            self._io.run(self._server.shutdown(), self.config.timeout_s)
        finally:
            self._io.stop()
            self._handover.close()
            for name in self._table.names():
                self.directory.unpublish(name)
            self.directory.close()
            self._table.close()

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _check_request(request: TransferRequest) -> None:
    buffer = request.buffer
    if not isinstance(buffer, memoryview) or not buffer.c_contiguous:
        raise InvalidParamsError("transfer buffers must be C-contiguous memoryviews")
    if request.op is TransferOp.READ and buffer.readonly:
        raise InvalidParamsError("a read needs a writable local buffer, got a read-only one")
    if buffer.format != "B" or buffer.ndim != 1:
        raise InvalidParamsError("transfer buffers must be flat byte views (use .cast('B'))")
    descriptor, offset = request.segment.descriptor, request.offset
    if offset < 0 or offset + buffer.nbytes > descriptor.size:
        check_range(descriptor.name, descriptor.size, offset, buffer.nbytes)
