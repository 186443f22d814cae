"""The transfer server: serves this process's segments to peers on other hosts.

A thin asyncio driver around :class:`SegmentTable`. Each connection parses frames with the
sans-I/O :class:`FrameReceiver`; a WRITE's payload is received straight into the segment,
a READ's reply is written straight from it. A malformed frame is answered with an error and
ends that connection only: the server keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
from typing import cast

from kvcake.common import codec
from kvcake.common.aio import set_nodelay
from kvcake.common.errors import KvcakeError, ProtocolError
from kvcake.common.frames import FrameHeader, FrameOp, FrameReceiver, pack_header
from kvcake.common.log import get_logger
from kvcake.transfer.messages import TransferCall
from kvcake.transfer.service import SegmentTable

log = get_logger(__name__)

MAX_CALL_BYTES = 1 << 20


def error_payload(error: KvcakeError) -> bytes:
    return str(error.args[0]).encode()[:4096]


class _Connection(asyncio.BufferedProtocol):
    def __init__(
        self, table: SegmentTable, max_payload: int, live: set[_Connection]
    ) -> None:
        self._table = table
        self._live = live
        self._receiver = FrameReceiver(self, max_payload)
        self._transport: asyncio.Transport | None = None
        self._write_error: KvcakeError | None = None  # a WRITE whose payload is being dropped
        self._out: list[bytes | memoryview] = []

    # asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._live.add(self)
        set_nodelay(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._receiver.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._receiver.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._reject(exc)
        finally:
            self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._live.discard(self)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # FrameSink
    def payload_buffer(self, header: FrameHeader) -> memoryview | None:
        if header.op is FrameOp.WRITE:
            try:
                return self._table.resolve(header.segment_id, header.offset, header.length)
            except KvcakeError as exc:
                self._write_error = exc
                return None
        if header.op is FrameOp.CALL and header.length <= MAX_CALL_BYTES:
            return memoryview(bytearray(header.length))
        raise ProtocolError(f"unexpected {header.length}-byte payload on a {header.op.name} frame")

    def frame_received(self, header: FrameHeader, payload: memoryview | None) -> None:
        if header.op is FrameOp.READ:
            self._serve_read(header)
        elif header.op is FrameOp.WRITE:
            self._finish_write(header)
        elif header.op is FrameOp.CALL:
            self._serve_call(header, payload)
        else:
            raise ProtocolError(f"a server does not accept {header.op.name} frames")

    def _serve_read(self, header: FrameHeader) -> None:
        try:
            view = self._table.resolve(header.segment_id, header.offset, header.length)
        except KvcakeError as exc:
            self._reply_error(FrameOp.READ_REPLY, header.request_id, exc)
            return
        reply = pack_header(
            FrameOp.READ_REPLY, header.request_id, header.segment_id, header.offset, len(view)
        )
        self._send(reply, view)

    def _finish_write(self, header: FrameHeader) -> None:
        error, self._write_error = self._write_error, None
        if error is not None:
            self._reply_error(FrameOp.WRITE_REPLY, header.request_id, error)
            return
        self._send(pack_header(FrameOp.WRITE_REPLY, header.request_id, header.segment_id))

    def _serve_call(self, header: FrameHeader, payload: memoryview | None) -> None:
        try:
            call = codec.decode(payload if payload is not None else b"", TransferCall)
            body = codec.encode(self._table.handle_call(call))
        except KvcakeError as exc:
            self._reply_error(FrameOp.CALL_REPLY, header.request_id, exc)
            return
        self._send(pack_header(FrameOp.CALL_REPLY, header.request_id, length=len(body)), body)

    def _reply_error(self, op: FrameOp, request_id: int, error: KvcakeError) -> None:
        message = error_payload(error)
        self._send(pack_header(op, request_id, length=len(message), status=error.code), message)

    def _reject(self, error: ProtocolError) -> None:
        log.warning("closing connection after a malformed frame: %s", error)
        self._reply_error(FrameOp.CALL_REPLY, 0, error)
        self._flush()
        if self._transport is not None:
            self._transport.close()  # flushes the error reply first

    def _send(self, *chunks: bytes | memoryview) -> None:
        self._out.extend(chunks)  # replies to one read of the socket leave in one writev

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self._transport is not None:
            self._transport.writelines(out)


class TransferServer:
    """Lifecycle of the TCP listener: ``await startup()`` → serve → ``await shutdown()``."""

    def __init__(self, table: SegmentTable, host: str, port: int, max_payload: int) -> None:
        self._table = table
        self._host = host
        self._port = port
        self._max_payload = max_payload
        self._server: asyncio.Server | None = None
        self._live: set[_Connection] = set()

    async def startup(self) -> str:
        """Bind and listen; returns the ``host:port`` endpoint peers should dial."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self._table, self._max_payload, self._live),
            self._host,
            self._port,
            reuse_address=True,
            backlog=256,
        )
        port = self._server.sockets[0].getsockname()[1]
        return f"{self._host}:{port}"

    async def shutdown(self, timeout: float = 5.0) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._live):
            connection.close()
        try:
            await asyncio.wait_for(self._server.wait_closed(), timeout)
        except TimeoutError:
            log.warning("transfer server connections still open after %.1fs", timeout)
        self._server = None

