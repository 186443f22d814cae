"""Binary framing shared by every kvcake socket, with a sans-I/O receiver.

Each frame is a fixed 40-byte little-endian header followed by ``length`` payload bytes::

    offset  size  field
    0       2     magic  b"KC"
    2       1     version (1)
    3       1     op     (FrameOp)
    4       4     status (i32, Mooncake ErrorCode; 0 in requests)
    8       8     request_id
    16      4     segment_id
    20      4     reserved (0)
    24      8     offset  (byte offset inside the segment)
    32      8     length  (payload bytes that follow; for READ, the bytes asked for, and
                           no payload follows)

Replies to a failed request carry a UTF-8 message as payload and a non-zero status. A
reply with request id 0 speaks for the whole connection (a broken frame, a refused
authentication): the peer then closes it.

:class:`FrameReceiver` turns "here are some bytes" into "here is a frame" without touching a
socket. It asks its sink where each payload belongs, so bulk bytes land straight in their
destination (a segment, a caller's buffer): the driver hands the receiver's buffers to
``recv_into`` / ``BufferedProtocol.get_buffer``. Headers arrive through a small staging area;
payload bytes that shared a ``recv`` with their header are copied once from there.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from kvcake.common.errors import ProtocolError

MAGIC = b"KC"
VERSION = 1
HEADER = struct.Struct("<2sBBiQIIQQ")
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 40

STAGING_BYTES = 256 * 1024
_DISCARD_BYTES = 256 * 1024
_LAZY_MIN_BYTES = 64 * 1024


class FrameOp(IntEnum):
    READ = 1
    READ_REPLY = 2
    WRITE = 3
    WRITE_REPLY = 4
    CALL = 5
    CALL_REPLY = 6
    AUTH_HELLO = 7  # the cluster-token handshake (see kvcake.common.auth)
    AUTH_CHALLENGE = 8
    AUTH_PROOF = 9
    GRANT = 10  # a segment owner's grant, ahead of the READ/WRITE frames it covers


@dataclass(frozen=True, slots=True)
class FrameHeader:
    op: FrameOp
    request_id: int
    segment_id: int = 0
    offset: int = 0
    length: int = 0
    status: int = 0

    @property
    def payload_size(self) -> int:
        return 0 if self.op is FrameOp.READ else self.length

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC, VERSION, self.op, self.status, self.request_id,
            self.segment_id, 0, self.offset, self.length,
        )


def pack_header(
    op: FrameOp, request_id: int, segment_id: int = 0, offset: int = 0, length: int = 0,
    status: int = 0,
) -> bytes:
    """Header bytes without building a :class:`FrameHeader` (the hot path of senders)."""
    return HEADER.pack(MAGIC, VERSION, op, status, request_id, segment_id, 0, offset, length)


def unpack_header(data: bytes | memoryview, max_payload: int) -> FrameHeader:
    """Parse and validate one header; :class:`ProtocolError` says what was wrong."""
    magic, version, op, status, request_id, segment_id, _, offset, length = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported frame version {version}, expected {VERSION}")
    try:
        frame_op = FrameOp(op)
    except ValueError:
        raise ProtocolError(f"unknown frame op {op}") from None
    if length > max_payload:
        raise ProtocolError(f"frame payload of {length} bytes exceeds the limit {max_payload}")
    return FrameHeader(frame_op, request_id, segment_id, offset, length, status)


def receive_buffer(size: int) -> memoryview:
    """``size`` zero bytes to receive into, whose memory is claimed only as bytes land there
    (large ones are an anonymous mapping): a peer that declares a big payload, or opens many
    connections, and then sends nothing costs no memory."""
    if size < _LAZY_MIN_BYTES:
        return memoryview(bytearray(size))
    return memoryview(mmap.mmap(-1, size))


class FrameSink(Protocol):
    """Where a :class:`FrameReceiver` delivers frames."""

    def payload_buffer(self, header: FrameHeader) -> memoryview | None:
        """Return the exactly ``header.length`` bytes the payload must land in, or ``None``
        to drop the payload. May raise :class:`ProtocolError` to end the connection."""

    def frame_received(self, header: FrameHeader, payload: memoryview | None) -> None:
        """A whole frame arrived; ``payload`` is the buffer given earlier (``None`` if
        dropped)."""


class FrameReceiver:
    """Sans-I/O frame parser: ``get_buffer`` to learn where to receive, ``buffer_updated``
    to say how many bytes arrived there. ``sink`` may be replaced between frames (an
    authentication gate hands the connection over once the peer proved itself)."""

    def __init__(self, sink: FrameSink, max_payload: int) -> None:
        self.sink = sink
        self._max_payload = max_payload
        self._staging = receive_buffer(STAGING_BYTES)
        self._start = 0  # first unparsed byte in staging
        self._end = 0  # one past the last received byte in staging
        self._header: FrameHeader | None = None  # frame whose payload is arriving
        self._target: memoryview | None = None
        self._discard: memoryview | None = None
        self._filled = 0

    def get_buffer(self) -> memoryview:
        if self._header is not None:
            return self._payload_window()
        if self._start == self._end:
            self._start = self._end = 0
        elif STAGING_BYTES - self._end < HEADER_SIZE:
            pending = self._end - self._start
            self._staging[:pending] = self._staging[self._start : self._end]
            self._start, self._end = 0, pending
        return self._staging[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._header is not None:
            self._filled += nbytes
            self._finish_payload_if_done()
            return
        self._end += nbytes
        self._parse_staged()

    @property
    def idle(self) -> bool:
        """True between frames (no partial header or payload buffered)."""
        return self._header is None and self._start == self._end

    def _payload_window(self) -> memoryview:
        assert self._header is not None
        remaining = self._header.payload_size - self._filled
        if self._target is not None:
            return self._target[self._filled :]
        if self._discard is None:
            self._discard = receive_buffer(_DISCARD_BYTES)
        return self._discard[: min(remaining, _DISCARD_BYTES)]

    def _parse_staged(self) -> None:
        while self._header is None and self._end - self._start >= HEADER_SIZE:
            header = unpack_header(
                self._staging[self._start : self._start + HEADER_SIZE], self._max_payload
            )
            self._start += HEADER_SIZE
            self._begin_payload(header)

    def _begin_payload(self, header: FrameHeader) -> None:
        size = header.payload_size
        target = self.sink.payload_buffer(header) if size else None
        if target is not None and len(target) != size:
            raise ProtocolError(f"payload buffer of {len(target)} bytes for a {size}-byte frame")
        staged = min(self._end - self._start, size)
        if target is not None and staged:
            target[:staged] = self._staging[self._start : self._start + staged]
        self._start += staged
        self._header, self._target, self._filled = header, target, staged
        self._finish_payload_if_done()

    def _finish_payload_if_done(self) -> None:
        header = self._header
        assert header is not None
        if self._filled < header.payload_size:
            return
        target = self._target
        self._header, self._target, self._filled = None, None, 0
        self.sink.frame_received(header, target)
