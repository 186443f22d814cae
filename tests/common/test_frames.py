import pytest

from kvcake.common.errors import ProtocolError
from kvcake.common.frames import (
    HEADER_SIZE,
    STAGING_BYTES,
    FrameHeader,
    FrameOp,
    FrameReceiver,
    pack_header,
    unpack_header,
)


class Sink:
    def __init__(self) -> None:
        self.frames: list[tuple[FrameHeader, bytes | None]] = []
        self.targets: list[memoryview] = []

    def payload_buffer(self, header: FrameHeader) -> memoryview | None:
        if header.segment_id == 99:
            return None  # drop it
        target = memoryview(bytearray(header.length))
        self.targets.append(target)
        return target

    def frame_received(self, header: FrameHeader, payload: memoryview | None) -> None:
        self.frames.append((header, None if payload is None else bytes(payload)))


def feed(receiver: FrameReceiver, data: bytes, chunk: int) -> None:
    view = memoryview(data)
    while view:
        buffer = receiver.get_buffer()
        n = min(len(buffer), chunk, len(view))
        buffer[:n] = view[:n]
        receiver.buffer_updated(n)
        view = view[n:]


def stream() -> bytes:
    big = bytes(range(256)) * 2000  # larger than the staging area
    return (
        pack_header(FrameOp.WRITE, 1, 7, 100, 5) + b"hello"
        + pack_header(FrameOp.READ, 2, 7, 0, 1 << 20)  # READ asks; no payload follows
        + pack_header(FrameOp.WRITE, 3, 99, 0, 3) + b"xyz"  # dropped by the sink
        + pack_header(FrameOp.WRITE, 4, 7, 0, len(big)) + big
    )


@pytest.mark.parametrize("chunk", [1, 7, 40, 4096, 1 << 30])
def test_frames_survive_any_split_of_the_stream(chunk: int) -> None:
    sink = Sink()
    receiver = FrameReceiver(sink, max_payload=1 << 20)
    feed(receiver, stream(), chunk)
    assert [(h.op, h.request_id, p) for h, p in sink.frames[:3]] == [
        (FrameOp.WRITE, 1, b"hello"), (FrameOp.READ, 2, None), (FrameOp.WRITE, 3, None)
    ]
    assert sink.frames[1][0].length == 1 << 20
    assert sink.frames[3][1] == bytes(range(256)) * 2000
    assert receiver.idle


def test_large_payloads_are_received_in_place() -> None:
    sink = Sink()
    receiver = FrameReceiver(sink, max_payload=1 << 22)
    feed(receiver, pack_header(FrameOp.WRITE, 1, 7, 0, 1 << 21), HEADER_SIZE)
    window = receiver.get_buffer()
    assert window.nbytes == 1 << 21  # the destination itself, not the staging area
    assert window.obj is sink.targets[0].obj
    assert STAGING_BYTES < 1 << 21


def test_header_round_trip() -> None:
    header = FrameHeader(FrameOp.CALL_REPLY, 5, 1, 2, 3, -101)
    assert unpack_header(header.pack(), 10) == header


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"XX" + pack_header(FrameOp.READ, 1)[2:], "magic"),
        (pack_header(FrameOp.READ, 1)[:2] + b"\x09" + pack_header(FrameOp.READ, 1)[3:],
         "version"),
        (pack_header(FrameOp.READ, 1)[:3] + b"\x63" + pack_header(FrameOp.READ, 1)[4:],
         "unknown frame op 99"),
        (pack_header(FrameOp.WRITE, 1, length=1 << 40), "exceeds the limit"),
    ],
)
def test_malformed_headers_are_named(raw: bytes, message: str) -> None:
    receiver = FrameReceiver(Sink(), max_payload=1 << 20)
    with pytest.raises(ProtocolError, match=message):
        feed(receiver, raw, 1 << 20)
