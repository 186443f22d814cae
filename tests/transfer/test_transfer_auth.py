"""Transfer engines with a cluster token: peers that hold it move bytes; others are refused."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from kvcake.common.auth import NO_AUTH, ClusterAuth
from kvcake.common.errors import AuthenticationError, ErrorCode
from kvcake.common.frames import HEADER_SIZE, FrameOp, pack_header, unpack_header
from kvcake.transfer import GrantMode, TransferEngine, TransferOp, TransferRequest

TOKEN = "transfer-token-" + "c" * 20
OTHER = "transfer-token-" + "d" * 20
MakeEngine = Callable[[ClusterAuth], TransferEngine]


@pytest.fixture
def tcp_engine(make_engine: Callable[..., TransferEngine]) -> MakeEngine:
    return lambda auth: make_engine(transport="tcp", auth=auth)


@pytest.fixture
def owner(tcp_engine: MakeEngine) -> TransferEngine:
    engine = tcp_engine(ClusterAuth(TOKEN))
    engine.register_segment("kv0", 1 << 20).view[:8] = b"original"
    return engine


def test_peers_with_the_token_handshake_and_move_bytes(owner: TransferEngine,
                                                       tcp_engine: MakeEngine) -> None:
    peer = tcp_engine(ClusterAuth(TOKEN))
    remote = peer.open_segment(f"{owner.endpoint}/kv0")  # the p2p handshake authenticates
    assert remote.transport == "tcp"
    grant = owner.sign_grant("kv0", 0, 1 << 20, GrantMode.READ | GrantMode.WRITE, 30)
    local = peer.allocate_buffer(1 << 20)
    local.view[:] = bytes(range(256)) * 4096
    peer.transfer([TransferRequest(TransferOp.WRITE, remote, 0, local.view, grant)])
    back = peer.allocate_buffer(1 << 20)
    peer.transfer([TransferRequest(TransferOp.READ, remote, 0, back.view, grant)])
    assert bytes(back.view) == bytes(local.view)


@pytest.mark.parametrize(("auth", "message"), [
    (NO_AUTH, "requires the cluster token"),
    (ClusterAuth(OTHER), "different cluster token"),
])
def test_a_peer_without_the_token_is_refused_and_the_owner_serves_on(
        owner: TransferEngine, tcp_engine: MakeEngine, auth: ClusterAuth, message: str) -> None:
    stranger = tcp_engine(auth)
    with pytest.raises(AuthenticationError, match=message):
        stranger.open_segment(f"{owner.endpoint}/kv0")
    remote = stranger.attach(owner.local_descriptor("kv0"))  # descriptor by other means
    buffer = stranger.allocate_buffer(8)
    buffer.view[:] = b"stranger"
    for attempt in (stranger.read, stranger.write):
        with pytest.raises(AuthenticationError, match=message) as caught:
            attempt(remote, 0, buffer.view)
        assert caught.value.code is ErrorCode.UNAUTHENTICATED
    friend = tcp_engine(ClusterAuth(TOKEN))
    check = friend.allocate_buffer(8)
    grant = owner.sign_grant("kv0", 0, 8, GrantMode.READ, 30)
    friend.transfer([TransferRequest(TransferOp.READ, friend.open_segment(
        f"{owner.endpoint}/kv0"), 0, check.view, grant)])
    assert bytes(check.view) == b"original"


def test_a_token_against_an_owner_without_one_is_a_clear_error(
        tcp_engine: MakeEngine) -> None:
    open_owner = tcp_engine(NO_AUTH)
    open_owner.register_segment("kv0", 4096)
    peer = tcp_engine(ClusterAuth(TOKEN))
    with pytest.raises(AuthenticationError, match="does not take a cluster token"):
        peer.open_segment(f"{open_owner.endpoint}/kv0")


def test_raw_read_and_write_frames_before_authentication_touch_nothing(
        owner: TransferEngine) -> None:
    segment_id = owner.local_descriptor("kv0").segment_id
    host, port = owner.endpoint.rsplit(":", 1)
    for frame in (pack_header(FrameOp.WRITE, 1, segment_id, 0, 8) + b"attacker",
                  pack_header(FrameOp.READ, 2, segment_id, 0, 8)):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(frame)
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        header = unpack_header(raw[:HEADER_SIZE], 1 << 20)
        assert (header.status, header.request_id) == (ErrorCode.UNAUTHENTICATED, 0)
        assert b"original" not in raw
    assert bytes(owner._table.get("kv0").view[:8]) == b"original"
