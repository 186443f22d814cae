"""A describe naming more than MAX_SEGMENT_NAMES segments is refused with INVALID_PARAMS while
it is decoded; the same connection then describes a segment as before."""

from __future__ import annotations

import socket
from collections.abc import Callable

from fuzzing import call_frame
from kvcake.common import codec
from kvcake.common.errors import ErrorCode
from kvcake.common.frames import FrameOp
from kvcake.transfer import TransferEngine
from kvcake.transfer.messages import MAX_SEGMENT_NAMES, DescribeReply, DescribeRequest
from wire import recv_frame


def test_an_over_long_describe_is_refused_and_the_server_serves_on(
        make_engine: Callable[..., TransferEngine]) -> None:
    engine = make_engine()
    engine.register_segment("kv0", 65536)
    host, port = engine.endpoint.rsplit(":", 1)
    over_long = codec.encode(DescribeRequest(["kv0"] * (MAX_SEGMENT_NAMES + 1)))
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(call_frame(1, over_long) + call_frame(2, codec.encode(
            DescribeRequest(["kv0"]))))
        (refused, text), (answered, body) = recv_frame(sock), recv_frame(sock)
    assert (refused.op, refused.request_id, refused.status) == (
        FrameOp.CALL_REPLY, 1, ErrorCode.INVALID_PARAMS)
    assert f"length <= {MAX_SEGMENT_NAMES}".encode() in text
    assert (answered.request_id, answered.status) == (2, 0)
    assert [s.name for s in codec.decode(body, DescribeReply).segments] == ["kv0"]
