"""Hostile frames against a live transfer server: every frame is answered (an error naming what
was wrong) or the connection ends, nothing hangs, no byte outside a legitimate write changes,
and afterwards a real engine reads and writes it byte for byte.

The served segment has a scratch window where fuzzed writes may land; the rest of it is a
guard holding a fixed pattern that no well-formed write addresses.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzzing import (
    Address,
    address_of,
    assert_error_frame,
    call_frame,
    decodes,
    exchange,
    fuzz_settings,
    open_partial_connections,
    rss_bytes,
    wait_until,
)
from kvcake.common import codec
from kvcake.common.aio import LoopThread
from kvcake.common.errors import ErrorCode
from kvcake.common.frames import HEADER, MAGIC, VERSION, FrameOp, pack_header
from kvcake.transfer import TransferEngine
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.messages import DescribeReply, DescribeRequest, TransferCall
from kvcake.transfer.server import MAX_CALL_BYTES, TransferServer
from kvcake.transfer.service import SegmentTable

SIZE = 65536
SCRATCH = 4096  # [0, SCRATCH): fuzzed writes may land here; the rest must never change
MAX_FRAME = 4 << 20  # more than a call may carry (MAX_CALL_BYTES)
PATTERN = random.Random(7).randbytes(SIZE)
REPLY_OPS = {FrameOp.READ_REPLY, FrameOp.WRITE_REPLY, FrameOp.CALL_REPLY}
REQUEST_OPS = [op for op in FrameOp if op not in REPLY_OPS]  # whatever ops exist now


@dataclass(frozen=True)
class Served:
    engine: TransferEngine
    address: Address
    segment_id: int

    def guard_intact(self) -> bool:
        view = self.engine_segment()
        return bytes(view[SCRATCH:]) == PATTERN[SCRATCH:]

    def engine_segment(self) -> memoryview:
        return self.engine._table.get("kv0").view


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    engine = TransferEngine(TransferConfig(max_frame_bytes=MAX_FRAME, timeout_s=5.0,
                                           metadata="local"))
    try:
        segment = engine.register_segment("kv0", SIZE)
        segment.view[:] = PATTERN
        yield Served(engine, address_of(engine.endpoint), segment.segment_id)
    finally:
        engine.close()


def assert_answers_are_errors_or_in_range(served: Served, data: bytes) -> None:
    frames, _ = exchange(served.address, data)
    for header, payload in frames:
        assert header.op in REPLY_OPS
        if header.status:
            assert_error_frame(header, payload, header.op)
    assert served.guard_intact(), "a byte outside every legitimate write changed"


# ----- framing

@fuzz_settings(150)
@given(data=st.binary(max_size=600))
def test_random_bytes(served: Served, data: bytes) -> None:
    assert_answers_are_errors_or_in_range(served, data)


@fuzz_settings(100)
@given(data=st.binary(max_size=300))
def test_random_bytes_after_a_good_magic(served: Served, data: bytes) -> None:
    assert_answers_are_errors_or_in_range(served, MAGIC + bytes([VERSION]) + data)


def segment_ids(served_id: int) -> st.SearchStrategy[int]:
    return st.just(served_id) | st.sampled_from([0, served_id + 1, 2**32 - 1]) \
        | st.integers(0, 2**32 - 1)


@st.composite
def frames(draw: st.DrawFn, served_id: int) -> bytes:
    """One frame: mostly a request op, addressing the scratch window, the guard's edges,
    out-of-range or huge places; its payload whole, cut short or overlong."""
    op = draw(st.sampled_from(REQUEST_OPS) | st.sampled_from(list(FrameOp))
              | st.integers(0, 255))
    segment_id = draw(segment_ids(served_id))
    length = draw(st.integers(0, 64) | st.sampled_from([SIZE, MAX_FRAME, MAX_FRAME + 1,
                                                        2**62, 2**64 - 1]))
    in_scratch = st.integers(0, max(0, SCRATCH - length))
    outside = st.integers(SIZE - length + 1, 2**64 - 1) if length <= SIZE else \
        st.integers(0, 2**64 - 1)
    offset = draw(in_scratch | outside)
    if segment_id == served_id and length <= SIZE and offset + length <= SIZE:
        offset = min(offset, max(0, SCRATCH - length))  # a legitimate write stays in scratch
    header = bytearray(HEADER.pack(MAGIC, VERSION, op, draw(st.integers(-(2**31), 2**31 - 1)),
                                   draw(st.integers(0, 2**64 - 1)), segment_id,
                                   draw(st.integers(0, 2**32 - 1)), offset, length))
    if draw(st.integers(0, 9)) == 0:
        header[draw(st.integers(0, 39))] = draw(st.integers(0, 255))
    sent = draw(st.integers(0, min(length, 80)) | st.just(min(length, 4096)))
    return bytes(header) + draw(st.binary(min_size=min(sent, 80), max_size=min(sent, 80))) \
        + bytes(max(0, sent - 80))


@fuzz_settings(150)
@given(data=st.data())
def test_frame_sequences(served: Served, data: st.DataObject) -> None:
    stream = b"".join(data.draw(st.lists(frames(served.segment_id), max_size=6)))
    assert_answers_are_errors_or_in_range(served, stream)


@fuzz_settings(60)
@given(op=st.sampled_from(REQUEST_OPS), length=st.integers(MAX_FRAME + 1, 2**64 - 1),
       tail=st.binary(max_size=64))
@example(op=FrameOp.WRITE, length=2**62, tail=b"")
def test_declared_lengths_over_the_limit_end_the_connection(served: Served, op: FrameOp,
                                                            length: int, tail: bytes) -> None:
    frames_back, _ = exchange(served.address,
                              pack_header(op, 3, served.segment_id, 0, length) + tail)
    assert len(frames_back) == 1
    header, payload = frames_back[0]
    assert_error_frame(header, payload)
    assert b"exceeds the limit" in payload
    assert served.guard_intact()


@fuzz_settings(60)
@given(segment_id=st.integers(0, 2**32 - 1), offset=st.integers(0, 2**64 - 1),
       length=st.integers(1, 2 * SIZE), read=st.booleans())
@example(segment_id=0, offset=0, length=1, read=True)
@example(segment_id=1, offset=SIZE, length=1, read=False)
@example(segment_id=1, offset=2**64 - 1, length=2, read=False)
def test_bad_addresses_are_answered_and_the_connection_kept(
        served: Served, segment_id: int, offset: int, length: int, read: bool) -> None:
    if segment_id == served.segment_id and offset + length <= SIZE:
        offset = SIZE - length + 1 + offset % 1000
    op, reply_op = (FrameOp.READ, FrameOp.READ_REPLY) if read else \
        (FrameOp.WRITE, FrameOp.WRITE_REPLY)
    payload = b"" if read else bytes(length)
    good = pack_header(FrameOp.READ, 9, served.segment_id, SCRATCH, 8)
    frames_back, reset = exchange(served.address,
                                  pack_header(op, 1, segment_id, offset, length) + payload + good)
    assert not reset and len(frames_back) == 2
    (header, message), (after, data) = frames_back
    assert_error_frame(header, message, reply_op)
    assert header.status in (ErrorCode.SEGMENT_NOT_FOUND, ErrorCode.BUFFER_OVERFLOW)
    assert (after.request_id, after.status, data) == (9, 0, PATTERN[SCRATCH : SCRATCH + 8])
    assert served.guard_intact()


# ----- control calls



SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=8) | st.binary(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
TAGS = st.sampled_from(["describe", "described", "Describe", "", "nope"]) | st.text(max_size=8)
MESSAGES = st.builds(lambda tag, fields: {"type": tag, **fields}, TAGS,
                     st.dictionaries(st.sampled_from(["names", "segments", "x"]), VALUES,
                                     max_size=3))


@fuzz_settings(150)
@given(body=st.binary(max_size=200) | st.one_of(MESSAGES, VALUES).map(msgspec.msgpack.encode))
@example(body=msgspec.msgpack.encode({"type": "describe", "names": ["ghost"]}))
@example(body=msgspec.msgpack.encode({"type": "describe", "names": "kv0"}))
@example(body=msgspec.msgpack.encode({"type": "described", "segments": []}))
@example(body=b"")
def test_control_calls_of_any_shape_are_answered_and_the_connection_kept(
        served: Served, body: bytes) -> None:
    good = pack_header(FrameOp.READ, 2, served.segment_id, SIZE - 4, 4)
    frames_back, reset = exchange(served.address, call_frame(1, body) + good)
    assert not reset and [h.request_id for h, _ in frames_back] == [1, 2], frames_back
    (header, payload), (after, data) = frames_back
    if not decodes(body, TransferCall):
        assert_error_frame(header, payload)
        assert header.status == ErrorCode.INVALID_PARAMS
    elif header.status:  # a describe of segments that do not exist
        assert_error_frame(header, payload)
        assert header.status == ErrorCode.SEGMENT_NOT_FOUND
    else:
        codec.decode(payload, DescribeReply)
    assert (after.status, data) == (0, PATTERN[-4:])


def test_a_call_over_its_limit_ends_the_connection(served: Served) -> None:
    frames_back, _ = exchange(served.address,
                              pack_header(FrameOp.CALL, 1, length=MAX_CALL_BYTES + 1))
    [(header, payload)] = frames_back
    assert_error_frame(header, payload)
    assert b"payload on a CALL frame" in payload


# ----- memory

def live_connections(thread: LoopThread, server: TransferServer) -> int:
    async def count() -> int:
        return len(server._live)
    return thread.run(count(), 5.0)


def test_partial_frames_declaring_the_most_cost_no_memory_and_are_cleaned_up() -> None:
    """A hundred connections each declare the largest call and the largest write, then wait:
    nothing is allocated for bytes that never came, and closing them frees everything."""
    table = SegmentTable("fuzz-host")
    thread = LoopThread("fuzz-transfer")
    server = TransferServer(table, "127.0.0.1", 0, MAX_FRAME)
    address = address_of(thread.run(server.startup(), 5.0))
    try:
        partial = (pack_header(FrameOp.WRITE, 1, 77, 0, MAX_FRAME) + bytes(100)
                   + pack_header(FrameOp.CALL, 2, length=MAX_CALL_BYTES))
        call_only = pack_header(FrameOp.CALL, 2, length=MAX_CALL_BYTES)
        before = rss_bytes()
        with open_partial_connections(address, call_only, 100), \
                open_partial_connections(address, partial, 20):
            wait_until(lambda: live_connections(thread, server) == 120)
            grown = rss_bytes() - before
        assert grown < 48 << 20, f"RSS grew by {grown >> 20} MiB for bytes never sent"
        wait_until(lambda: live_connections(thread, server) == 0)
        frames_back, _ = exchange(address, call_frame(3, codec.encode(DescribeRequest())))
        assert frames_back[0][0].status == 0
    finally:
        thread.run(server.shutdown(), 5.0)
        thread.stop()


# ----- afterwards

def test_after_fuzzing_a_real_engine_reads_and_writes_byte_exact(served: Served) -> None:
    with TransferEngine(TransferConfig(transport="tcp", timeout_s=5.0)) as client:
        remote = client.attach(served.engine.local_descriptor("kv0"))
        data = random.Random(3).randbytes(SCRATCH)
        client.write(remote, 0, memoryview(data))
        back = client.allocate_buffer(SIZE)
        client.read(remote, 0, back.view)
        assert bytes(back.view) == data + PATTERN[SCRATCH:]
    with socket.create_connection(served.address, timeout=5):
        pass  # and it still accepts connections
