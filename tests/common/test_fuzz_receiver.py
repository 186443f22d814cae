"""The sans-I/O FrameReceiver against a reference parser: any byte stream, split anywhere,
yields exactly the reference's frames or raises ProtocolError where the reference fails, and
its own memory stays at its two fixed buffers whatever lengths the headers declare."""

from __future__ import annotations

import itertools
import struct
import tracemalloc
from dataclasses import dataclass, field

from hypothesis import example, given
from hypothesis import strategies as st

from fuzzing import fuzz_settings
from kvcake.common.errors import ProtocolError
from kvcake.common.frames import (
    _DISCARD_BYTES,
    HEADER_SIZE,
    MAGIC,
    STAGING_BYTES,
    VERSION,
    FrameHeader,
    FrameOp,
    FrameReceiver,
    pack_header,
)

MAX_PAYLOAD = 4096
OPS = [int(op) for op in FrameOp]
Frame = tuple[FrameHeader, bytes | None]


# ----- the reference: one header at a time, written from the format table alone

def reference(data: bytes, max_payload: int, dropped: set[int]) -> tuple[list[Frame], bool]:
    """The whole frames in ``data``, and whether a header in it is malformed."""
    frames: list[Frame] = []
    position = 0
    while len(data) - position >= HEADER_SIZE:
        magic, version, op, status, request_id, segment_id, _, offset, length = struct.unpack(
            "<2sBBiQIIQQ", data[position : position + HEADER_SIZE])
        if magic != MAGIC or version != VERSION or op not in OPS or length > max_payload:
            return frames, True
        header = FrameHeader(FrameOp(op), request_id, segment_id, offset, length, status)
        size = 0 if header.op is FrameOp.READ else length
        start = position + HEADER_SIZE
        if start + size > len(data):
            break
        keep = size and request_id not in dropped
        frames.append((header, data[start : start + size] if keep else None))
        position = start + size
    return frames, False


@dataclass
class Sink:
    """Keeps payloads unless their request id is in ``dropped``; checks each ask."""

    max_payload: int
    dropped: set[int]
    frames: list[Frame] = field(default_factory=list)

    def payload_buffer(self, header: FrameHeader) -> memoryview | None:
        assert 0 < header.payload_size <= self.max_payload
        if header.request_id in self.dropped:
            return None
        return memoryview(bytearray(header.length))

    def frame_received(self, header: FrameHeader, payload: memoryview | None) -> None:
        self.frames.append((header, None if payload is None else bytes(payload)))


def feed(receiver: FrameReceiver, data: bytes, cuts: list[int]) -> None:
    """``data`` delivered in the pieces ``cuts`` makes, each as few reads as the receiver's
    buffers allow (as a socket would)."""
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        piece = memoryview(data)[start:end]
        while piece:
            buffer = receiver.get_buffer()
            assert len(buffer) > 0, "the receiver offered no room"
            n = min(len(buffer), len(piece))
            buffer[:n] = piece[:n]
            receiver.buffer_updated(n)
            piece = piece[n:]


def run(data: bytes, cuts: list[int], dropped: set[int],
        max_payload: int = MAX_PAYLOAD) -> tuple[list[Frame], bool, FrameReceiver]:
    sink = Sink(max_payload, dropped)
    receiver = FrameReceiver(sink, max_payload)
    try:
        feed(receiver, data, cuts)
    except ProtocolError:
        return sink.frames, True, receiver
    return sink.frames, False, receiver


def assert_matches_reference(data: bytes, cuts: list[int], dropped: set[int]) -> None:
    expected, malformed = reference(data, MAX_PAYLOAD, dropped)
    frames, failed, receiver = run(data, cuts, dropped)
    assert frames == expected
    assert failed == malformed
    if not failed:
        ends_on_a_frame = sum(HEADER_SIZE + h.payload_size for h, _ in frames) == len(data)
        assert receiver.idle == ends_on_a_frame


# ----- streams: mostly valid headers, now and then a broken field

@st.composite
def headers(draw: st.DrawFn) -> bytes:
    op = draw(st.sampled_from(OPS) | st.integers(0, 255))
    length = draw(st.integers(0, 64) | st.integers(0, MAX_PAYLOAD + 1)
                  | st.integers(0, 2**64 - 1))
    raw = bytearray(struct.pack("<2sBBiQIIQQ", MAGIC, VERSION, op,
                                draw(st.integers(-(2**31), 2**31 - 1)),
                                draw(st.integers(0, 7)), draw(st.integers(0, 2**32 - 1)),
                                0, draw(st.integers(0, 2**64 - 1)), length))
    if draw(st.integers(0, 9)) == 0:  # one corrupted byte, anywhere in the header
        raw[draw(st.integers(0, HEADER_SIZE - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        header = draw(headers())
        length = struct.unpack_from("<Q", header, 32)[0]
        sent = min(length, MAX_PAYLOAD) if draw(st.booleans()) else draw(st.integers(0, 64))
        parts.append(header + draw(st.binary(min_size=min(sent, 64), max_size=min(sent, 64)))
                     + bytes(max(0, sent - 64)))
    return b"".join(parts) + draw(st.binary(max_size=50))


CUTS = st.lists(st.integers(0, 1 << 16), max_size=8)
DROPPED = st.sets(st.integers(0, 7), max_size=3)


@fuzz_settings(300)
@given(data=streams(), cuts=CUTS, dropped=DROPPED)
@example(data=pack_header(FrameOp.WRITE, 1, length=3) + b"abc", cuts=[41, 42], dropped=set())
@example(data=pack_header(FrameOp.READ, 2, length=MAX_PAYLOAD), cuts=[1], dropped=set())
@example(data=pack_header(FrameOp.CALL, 3, length=MAX_PAYLOAD + 1), cuts=[], dropped=set())
@example(data=b"KC\x01\x00" + bytes(36), cuts=[], dropped=set())
def test_any_split_of_a_stream_gives_the_reference_frames(data: bytes, cuts: list[int],
                                                          dropped: set[int]) -> None:
    assert_matches_reference(data, cuts, dropped)


@fuzz_settings(200)
@given(data=st.binary(max_size=400), cuts=CUTS)
def test_random_bytes_give_the_reference_frames(data: bytes, cuts: list[int]) -> None:
    assert_matches_reference(data, cuts, set())


@fuzz_settings(30)
@given(size=st.integers(STAGING_BYTES - 100, STAGING_BYTES + 3 * HEADER_SIZE),
       cuts=st.lists(st.integers(0, 1 << 19), max_size=6), dropped=DROPPED)
def test_frames_straddling_the_staging_area_end(size: int, cuts: list[int],
                                                dropped: set[int]) -> None:
    # many small frames fill staging and make it wrap around mid-header
    small = b"".join(pack_header(FrameOp.WRITE, i % 8, length=i % 50) + bytes([i % 256]) * (i % 50)
                     for i in range(size // 64))
    data = small + pack_header(FrameOp.CALL, 5, length=MAX_PAYLOAD) + bytes(MAX_PAYLOAD)
    assert_matches_reference(data, cuts, dropped)


# ----- memory: the receiver's own buffers only, whatever lengths are declared

@fuzz_settings(20)
@given(lengths=st.lists(st.integers(0, 2**62), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 1 << 20), max_size=4))
def test_dropped_payloads_cost_only_the_fixed_buffers(lengths: list[int],
                                                      cuts: list[int]) -> None:
    """Huge declared payloads the sink drops are read through one small discard buffer."""
    budget = 3 * _DISCARD_BYTES  # payload bytes sent per frame, more than discard holds
    sent = b""
    for n in lengths:
        sent += pack_header(FrameOp.WRITE, 1, length=n) + bytes(min(n, budget))
        if n > budget:
            break  # the rest of this payload never comes
    tracemalloc.start()
    try:
        sink = Sink(2**62, {1})
        receiver = FrameReceiver(sink, 2**62)
        feed(receiver, sent, cuts)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < STAGING_BYTES + _DISCARD_BYTES + 64 * 1024
    assert all(payload is None for _, payload in sink.frames)
