"""Raw sockets against a transfer server: malformed frames get an error, the server serves on."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from kvcake.common.errors import ErrorCode
from kvcake.common.frames import FrameOp, pack_header
from kvcake.transfer import TransferEngine
from wire import recv_frame


@pytest.fixture
def server(make_engine: Callable[..., TransferEngine]) -> Iterator[tuple[str, int, int]]:
    engine = make_engine(max_frame_bytes=1 << 20)
    segment = engine.register_segment("kv0", 65536)
    segment.view[:4] = b"data"
    host, port = engine.endpoint.rsplit(":", 1)
    yield host, int(port), segment.segment_id


def connect(server: tuple[str, int, int]) -> socket.socket:
    return socket.create_connection(server[:2], timeout=5)


def assert_still_serving(server: tuple[str, int, int]) -> None:
    with connect(server) as sock:
        sock.sendall(pack_header(FrameOp.READ, 7, server[2], 0, 4))
        header, payload = recv_frame(sock)
    assert (header.op, header.status, payload) == (FrameOp.READ_REPLY, 0, b"data")


def assert_closed(sock: socket.socket) -> None:
    assert sock.recv(1) == b""


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"ZZ" + pack_header(FrameOp.READ, 1)[2:], b"magic"),
        (pack_header(FrameOp.READ, 1)[:3] + b"\x77" + pack_header(FrameOp.READ, 1)[4:],
         b"unknown frame op"),
        (pack_header(FrameOp.WRITE, 1, 1, 0, 1 << 40), b"exceeds the limit"),
        (pack_header(FrameOp.READ_REPLY, 1, 1, 0, 0), b"does not accept"),
    ],
)
def test_malformed_frame_gets_an_error_and_the_connection_ends(
    server: tuple[str, int, int], frame: bytes, message: bytes
) -> None:
    with connect(server) as sock:
        sock.sendall(frame)
        header, payload = recv_frame(sock)
        assert header.status == ErrorCode.INVALID_PARAMS
        assert message in payload
        assert_closed(sock)
    assert_still_serving(server)


def test_truncated_header_then_hang_up(server: tuple[str, int, int]) -> None:
    with connect(server) as sock:
        sock.sendall(pack_header(FrameOp.READ, 1, server[2], 0, 4)[:17])
    assert_still_serving(server)


def test_truncated_payload_then_hang_up_leaves_other_bytes_alone(
    server: tuple[str, int, int],
) -> None:
    with connect(server) as sock:
        sock.sendall(pack_header(FrameOp.WRITE, 1, server[2], 100, 1000) + b"x" * 10)
    assert_still_serving(server)


def test_bad_ranges_and_ids_are_answered_and_the_connection_kept(
    server: tuple[str, int, int],
) -> None:
    segment_id = server[2]
    with connect(server) as sock:
        sock.sendall(pack_header(FrameOp.WRITE, 1, segment_id, 65530, 10) + b"0123456789")
        header, payload = recv_frame(sock)
        assert header.status == ErrorCode.BUFFER_OVERFLOW
        assert b"outside segment" in payload
        sock.sendall(pack_header(FrameOp.READ, 2, 999, 0, 4))
        header, payload = recv_frame(sock)
        assert header.status == ErrorCode.SEGMENT_NOT_FOUND
        sock.sendall(pack_header(FrameOp.READ, 3, segment_id, 0, 4))
        header, payload = recv_frame(sock)
        assert (header.request_id, payload) == (3, b"data")


def test_garbage_control_call_is_answered(server: tuple[str, int, int]) -> None:
    with connect(server) as sock:
        sock.sendall(pack_header(FrameOp.CALL, 4, length=3) + b"\xc1\xc1\xc1")
        header, payload = recv_frame(sock)
        assert header.status == ErrorCode.INVALID_PARAMS
        assert b"malformed control message" in payload
    assert_still_serving(server)
