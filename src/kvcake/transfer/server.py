"""The transfer server: serves this process's segments to peers on other hosts.

A thin asyncio driver around :class:`SegmentTable`. Each connection parses frames with the
sans-I/O :class:`FrameReceiver`; a WRITE's payload is received straight into the segment,
a READ's reply is written straight from it. A malformed frame is answered with an error and
ends that connection only: the server keeps serving everyone else.

When the table requires grants (a cluster token is configured), each connection keeps a
:class:`GrantTable` of the GRANT frames it presented, and a READ or WRITE outside them is
refused with ``ACCESS_DENIED``: a refused WRITE's payload is dropped, never written
(:mod:`kvcake.transfer.grants`). Without, the path is the same as ever.
"""

from __future__ import annotations

import time

from kvcake.common import codec
from kvcake.common.auth import ClusterAuth
from kvcake.common.errors import KvcakeError, ProtocolError
from kvcake.common.frames import FrameHeader, FrameOp, pack_header, receive_buffer
from kvcake.common.stream import FramedServerConnection, FrameListener
from kvcake.transfer.grants import MAX_GRANT_BYTES, GrantMode, GrantTable
from kvcake.transfer.messages import TransferCall
from kvcake.transfer.service import SegmentTable

MAX_CALL_BYTES = 1 << 20


class _Connection(FramedServerConnection):
    def __init__(self, table: SegmentTable, max_payload: int,
                 live: set[FramedServerConnection]) -> None:
        super().__init__(max_payload, live)
        self._table = table
        self._write_error: KvcakeError | None = None  # a WRITE whose payload is being dropped
        self._grants = GrantTable() if table.requires_grants else None

    def _resolve(self, header: FrameHeader, mode: GrantMode) -> memoryview:
        if self._grants is None:
            return self._table.resolve(header.segment_id, header.offset, header.length)
        return self._table.resolve_granted(self._grants, header.segment_id, header.offset,
                                           header.length, mode, time.time())

    # FrameSink
    def payload_buffer(self, header: FrameHeader) -> memoryview | None:
        if header.op is FrameOp.WRITE:
            try:
                return self._resolve(header, GrantMode.WRITE)
            except KvcakeError as exc:
                self._write_error = exc
                return None
        if header.op is FrameOp.CALL and header.length <= MAX_CALL_BYTES:
            return receive_buffer(header.length)
        if header.op is FrameOp.GRANT and header.length <= MAX_GRANT_BYTES:
            return receive_buffer(header.length)
        raise ProtocolError(f"unexpected {header.length}-byte payload on a {header.op.name} frame")

    def frame_received(self, header: FrameHeader, payload: memoryview | None) -> None:
        if header.op is FrameOp.READ:
            self._serve_read(header)
        elif header.op is FrameOp.WRITE:
            self._finish_write(header)
        elif header.op is FrameOp.CALL:
            self._serve_call(header, payload)
        elif header.op is FrameOp.GRANT:
            if self._grants is not None:  # no reply: a bad grant shows in the refusal it causes
                self._grants.present(payload or b"", self._table.grant_keys, time.time())
        else:
            raise ProtocolError(f"a server does not accept {header.op.name} frames")

    def _serve_read(self, header: FrameHeader) -> None:
        try:
            view = self._resolve(header, GrantMode.READ)
        except KvcakeError as exc:
            self.reply_error(FrameOp.READ_REPLY, header.request_id, exc)
            return
        reply = pack_header(
            FrameOp.READ_REPLY, header.request_id, header.segment_id, header.offset, len(view)
        )
        self.send(reply, view)

    def _finish_write(self, header: FrameHeader) -> None:
        error, self._write_error = self._write_error, None
        if error is not None:
            self.reply_error(FrameOp.WRITE_REPLY, header.request_id, error)
            return
        self.send(pack_header(FrameOp.WRITE_REPLY, header.request_id, header.segment_id))

    def _serve_call(self, header: FrameHeader, payload: memoryview | None) -> None:
        try:
            call = codec.decode(payload if payload is not None else b"", TransferCall)
            body = codec.encode(self._table.handle_call(call))
        except KvcakeError as exc:
            self.reply_error(FrameOp.CALL_REPLY, header.request_id, exc)
            return
        self.send(pack_header(FrameOp.CALL_REPLY, header.request_id, length=len(body)), body)


class TransferServer(FrameListener):
    """The TCP listener of one engine's segments; ``auth`` as :class:`FrameListener`'s."""

    def __init__(self, table: SegmentTable, host: str, port: int, max_payload: int,
                 auth: ClusterAuth | None = None) -> None:
        super().__init__(lambda live: _Connection(table, max_payload, live), host, port,
                         "transfer server", auth)
