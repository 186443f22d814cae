"""Client side of the TCP transport: connections to one peer and the frames in flight.

Runs on the engine's I/O loop only. A READ reply's payload is received straight into the
caller's buffer; a WRITE sends the caller's buffer without copying it first. A part's grant
goes ahead of it as a GRANT frame, once per connection while the server still holds it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from kvcake.common.auth import NO_AUTH, ClusterAuth
from kvcake.common.errors import (
    KvcakeError,
    ProtocolError,
    TransferError,
    error_from_code,
)
from kvcake.common.frames import FrameHeader, FrameOp, pack_header
from kvcake.common.rpc import MAX_ERROR_BYTES
from kvcake.common.stream import FramedProtocol, authenticate
from kvcake.transfer.batch import Batch, TransferOp
from kvcake.transfer.grants import PresentedGrants

_request_ids = itertools.count(1)


@dataclass(slots=True)
class Part:
    """One frame's worth of a transfer request: ``buffer`` <-> ``segment_id[offset:]``."""

    batch: Batch
    index: int
    op: TransferOp
    segment_id: int
    offset: int
    buffer: memoryview
    grant: bytes = b""


class PeerConnection(FramedProtocol):
    """One TCP connection to a peer's transfer server."""

    def __init__(
        self, endpoint: str, max_payload: int, on_lost: Callable[[PeerConnection], None]
    ) -> None:
        super().__init__(max_payload)
        self.endpoint = endpoint
        self._on_lost = on_lost
        self._pending: dict[int, Part] = {}
        self._grants = PresentedGrants()

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def send(self, parts: list[Part]) -> None:
        assert self.transport is not None
        chunks: list[bytes | memoryview] = []
        for part in parts:
            request_id = next(_request_ids)
            self._pending[request_id] = part
            if part.grant and self._grants.needs_sending(part.grant):
                chunks += (pack_header(FrameOp.GRANT, 0, length=len(part.grant)), part.grant)
            op = FrameOp.READ if part.op is TransferOp.READ else FrameOp.WRITE
            chunks.append(
                pack_header(op, request_id, part.segment_id, part.offset, part.buffer.nbytes)
            )
            if part.op is TransferOp.WRITE:
                chunks.append(part.buffer)
        self.transport.writelines(chunks)

    def fail_batch(self, batch: Batch, error: KvcakeError) -> None:
        """Fail this batch's frames here; the connection is then in an unknown state: drop it."""
        mine = [rid for rid, part in self._pending.items() if part.batch is batch]
        if not mine:
            return
        for request_id in mine:
            part = self._pending.pop(request_id)
            part.batch.complete(part.index, error)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # FramedProtocol
    def protocol_error(self, error: ProtocolError) -> None:
        self._fail_all(TransferError(f"peer {self.endpoint} broke the protocol: {error}"))
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        reason = f"{exc}" if exc else "closed by the peer"
        self._fail_all(TransferError(f"connection to peer {self.endpoint} lost: {reason}"))
        self._on_lost(self)

    # FrameSink
    def payload_buffer(self, header: FrameHeader) -> memoryview | None:
        if header.status != 0:
            if header.length > MAX_ERROR_BYTES:
                raise ProtocolError(f"error message of {header.length} bytes")
            return memoryview(bytearray(header.length))
        part = self._pending.get(header.request_id)
        if header.op is not FrameOp.READ_REPLY or part is None:
            raise ProtocolError(f"unexpected payload on {header.op.name} #{header.request_id}")
        if header.length != part.buffer.nbytes:
            raise ProtocolError(f"read reply of {header.length} bytes, asked {part.buffer.nbytes}")
        return part.buffer

    def frame_received(self, header: FrameHeader, payload: memoryview | None) -> None:
        error = None
        if header.status != 0:
            text = bytes(payload or b"").decode(errors="replace")
            error = error_from_code(header.status, f"peer {self.endpoint}: {text}")
        if header.request_id == 0 and error is not None:
            self._fail_all(error)  # the peer rejected the connection as a whole: never reuse it
            self.abort()
            self._on_lost(self)
            return
        part = self._pending.pop(header.request_id, None)
        if part is not None:
            part.batch.complete(part.index, error)

    def _fail_all(self, error: KvcakeError) -> None:
        pending, self._pending = self._pending, {}
        for part in pending.values():
            part.batch.complete(part.index, error)


class PeerClient:
    """The connections to one peer; spreads each submission over them. With ``auth``
    enabled each connection authenticates (within ``timeout_s``) before its first frame."""

    def __init__(
        self, endpoint: str, num_connections: int, max_payload: int, spread_bytes: int,
        auth: ClusterAuth = NO_AUTH, timeout_s: float = 30.0,
    ) -> None:
        self.endpoint = endpoint
        self.spread_bytes = spread_bytes
        self._auth = auth
        self._timeout_s = timeout_s
        self._num_connections = num_connections
        self._max_payload = max_payload
        self._connections: list[PeerConnection] = []
        self._connecting: asyncio.Task[None] | None = None
        self._next = 0

    def submit(self, parts: list[Part]) -> None:
        if len(self._connections) == self._num_connections:
            self._send(parts)
            return
        asyncio.get_running_loop().create_task(self._connect_then_send(parts))

    async def _connect_then_send(self, parts: list[Part]) -> None:
        try:
            await self._ensure_connected()
        except (OSError, KvcakeError) as exc:
            error = exc if isinstance(exc, KvcakeError) else TransferError(
                f"cannot connect to peer {self.endpoint}: {exc}")
            for part in parts:
                part.batch.complete(part.index, error)
            return
        self._send(parts)

    async def _ensure_connected(self) -> None:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        await asyncio.shield(self._connecting)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        host, _, port = self.endpoint.rpartition(":")
        while len(self._connections) < self._num_connections:
            _, connection = await loop.create_connection(
                lambda: PeerConnection(self.endpoint, self._max_payload, self._forget),
                host,
                int(port),
            )
            if self._auth.enabled:
                try:
                    await authenticate(connection, self._auth, f"peer {self.endpoint}",
                                       self._timeout_s)
                except BaseException:
                    connection.abort()
                    raise
            self._connections.append(connection)

    def _send(self, parts: list[Part]) -> None:
        """Small parts share the first connection (one stream pipelines them best); big ones
        are dealt round-robin so several streams carry them at once."""
        count = len(self._connections)
        groups: list[list[Part]] = [[] for _ in range(count)]
        for part in parts:
            if part.buffer.nbytes < self.spread_bytes:
                groups[0].append(part)
            else:
                groups[self._next % count].append(part)
                self._next += 1
        for connection, group in zip(self._connections, groups, strict=True):
            if group:
                connection.send(group)

    def fail_batch(self, batch: Batch, error: KvcakeError) -> None:
        for connection in list(self._connections):
            connection.fail_batch(batch, error)

    def _forget(self, connection: PeerConnection) -> None:
        if connection in self._connections:
            self._connections.remove(connection)

    def close(self) -> None:
        for connection in list(self._connections):
            connection.abort()
