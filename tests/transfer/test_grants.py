"""Grants: signing and checking them, and transfer servers that serve only inside them."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest

from kvcake.common.auth import ClusterAuth
from kvcake.common.errors import AccessDeniedError, ErrorCode
from kvcake.common.frames import FrameOp, pack_header
from kvcake.transfer import GrantMode, RemoteSegment, TransferEngine, TransferOp, TransferRequest
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.grants import (
    CLOCK_SKEW_S,
    Grant,
    GrantTable,
    PresentedGrants,
    new_grant_key,
    open_grant,
    sign_grant,
)
from wire import authenticated_socket, grant_frame, recv_frame

TOKEN = "grants-token-" + "g" * 24
NOW = 1_700_000_000.0
KEY = new_grant_key()


# ----- signing and checking, without I/O
def test_a_grant_covers_its_range_and_mode_only() -> None:
    grant = open_grant(sign_grant(KEY, "kv", 100, 50, GrantMode.READ, NOW + 10), {"kv": KEY},
                       NOW)
    assert grant.covers(100, 50, GrantMode.READ) and grant.covers(120, 30, GrantMode.READ)
    assert not grant.covers(99, 10, GrantMode.READ)
    assert not grant.covers(140, 11, GrantMode.READ)
    assert not grant.covers(100, 50, GrantMode.WRITE)


def test_a_strided_grant_covers_each_of_its_runs() -> None:
    # blocks 2..3 of a (layers=2, kv=2) cache of 16 slots of 8 bytes, 4 slots a block
    blob = sign_grant(KEY, "kv", 2 * 32, 2 * 32, GrantMode.WRITE, NOW + 10, stride=16 * 8,
                      count=4)
    grant = open_grant(blob, {"kv": KEY}, NOW)
    for run in range(4):
        assert grant.covers(run * 128 + 64, 64, GrantMode.WRITE)
        assert not grant.covers(run * 128 + 32, 64, GrantMode.WRITE)  # block 1: not ours
    assert not grant.covers(4 * 128 + 64, 64, GrantMode.WRITE)  # past the last run


@pytest.mark.parametrize(("blob", "keys", "now", "message"), [
    (sign_grant(KEY, "kv", 0, 8, GrantMode.READ, NOW), {"kv": new_grant_key()}, NOW,
     "bad signature"),
    (sign_grant(KEY, "kv", 0, 8, GrantMode.READ, NOW), {"other": KEY}, NOW, "not here"),
    (sign_grant(KEY, "kv", 0, 8, GrantMode.READ, NOW), {"kv": KEY}, NOW + CLOCK_SKEW_S + 1,
     "expired"),
    (b"\x93garbage", {"kv": KEY}, NOW, "malformed grant"),
])
def test_forged_foreign_expired_and_garbled_grants_are_refused(
        blob: bytes, keys: dict[str, bytes], now: float, message: str) -> None:
    with pytest.raises(AccessDeniedError, match=message):
        open_grant(blob, keys, now)


def _widened(blob: bytes, length: int) -> bytes:
    """The same grant with a larger ``length`` and the original signature."""
    grant = msgspec.msgpack.decode(blob, type=Grant)
    return msgspec.msgpack.encode(msgspec.structs.replace(grant, length=length))


def test_a_tampered_field_breaks_the_signature() -> None:
    blob = sign_grant(KEY, "kv", 0, 8, GrantMode.READ, NOW + 10)
    with pytest.raises(AccessDeniedError, match="bad signature"):
        open_grant(_widened(blob, 4096), {"kv": KEY}, NOW)


def test_the_table_forgets_the_least_recently_presented_and_the_client_mirrors_it() -> None:
    table, mirror = GrantTable(capacity=2), PresentedGrants(capacity=2)
    blobs = [sign_grant(KEY, "kv", i * 8, 8, GrantMode.READ, NOW + 10) for i in range(3)]
    for blob in blobs:
        assert mirror.needs_sending(blob)
        table.present(blob, {"kv": KEY}, NOW)
    assert len(table) == 2
    with pytest.raises(AccessDeniedError, match=r"READ of \[0, 8\).*no live grant"):
        table.check("kv", 0, 8, GrantMode.READ, NOW)
    table.check("kv", 16, 8, GrantMode.READ, NOW)
    assert not mirror.needs_sending(blobs[2]) and mirror.needs_sending(blobs[0])


def test_a_refused_grant_is_named_in_the_denial() -> None:
    table = GrantTable()
    table.present(sign_grant(KEY, "kv", 0, 8, GrantMode.READ, NOW - 60), {"kv": KEY}, NOW)
    with pytest.raises(AccessDeniedError, match=r"last grant refused: .*expired"):
        table.check("kv", 0, 8, GrantMode.READ, NOW)


# ----- transfer servers with a token
MakeEngine = Callable[[], TransferEngine]


@pytest.fixture
def tcp_engine(make_engine: Callable[..., TransferEngine]) -> MakeEngine:
    return lambda: make_engine(transport="tcp", auth=ClusterAuth(TOKEN))


@pytest.fixture
def owner(tcp_engine: MakeEngine) -> TransferEngine:
    engine = tcp_engine()
    engine.register_segment("kv0", 4096).view[:] = b"\xee" * 4096
    return engine


def _reader(tcp_engine: MakeEngine, owner: TransferEngine) -> tuple[TransferEngine,
                                                                    RemoteSegment]:
    peer = tcp_engine()
    return peer, peer.open_segment(f"{owner.endpoint}/kv0")


def test_reads_and_writes_inside_a_grant_are_served(owner: TransferEngine,
                                                    tcp_engine: MakeEngine) -> None:
    peer, remote = _reader(tcp_engine, owner)
    grant = owner.sign_grant("kv0", 1024, 512, GrantMode.READ | GrantMode.WRITE, 30)
    data = peer.allocate_buffer(512)
    data.view[:] = bytes(range(256)) * 2
    peer.transfer([_request(peer, "w", remote, 1024, data.view, grant)])
    back = peer.allocate_buffer(512)
    peer.transfer([_request(peer, "r", remote, 1024, back.view, grant)])
    assert bytes(back.view) == bytes(data.view)


def _request(peer: TransferEngine, op: str, remote: RemoteSegment, offset: int,
             view: memoryview, grant: bytes) -> TransferRequest:
    kind = TransferOp.READ if op == "r" else TransferOp.WRITE
    return TransferRequest(kind, remote, offset, view, grant)


def test_frames_without_or_outside_a_grant_are_refused_and_touch_nothing(
        owner: TransferEngine, tcp_engine: MakeEngine) -> None:
    peer, remote = _reader(tcp_engine, owner)
    buffer = peer.allocate_buffer(600)
    buffer.view[:] = b"\x11" * 600
    read_only = owner.sign_grant("kv0", 1024, 512, GrantMode.READ, 30)
    other = tcp_engine()
    other.register_segment("kv0", 4096)
    foreign = other.sign_grant("kv0", 0, 4096, GrantMode.WRITE, 30)  # same name, other owner
    for grant, offset in ((b"", 0), (read_only, 1024), (foreign, 0)):
        with pytest.raises(AccessDeniedError) as caught:
            peer.transfer([_request(peer, "w", remote, offset, buffer.view, grant)])
        assert caught.value.code is ErrorCode.ACCESS_DENIED
    with pytest.raises(AccessDeniedError, match=r"READ of \[1024, 1624\)"):
        peer.transfer([_request(peer, "r", remote, 1024, buffer.view, read_only)])
    assert bytes(owner._table.get("kv0").view) == b"\xee" * 4096


def test_without_a_token_no_grant_is_asked_for(tcp_engine: MakeEngine) -> None:
    open_owner = TransferEngine(TransferConfig(transport="tcp"), auth=ClusterAuth())
    try:
        open_owner.register_segment("kv0", 64)
        assert open_owner.grant_key("kv0") == b""
        assert open_owner.sign_grant("kv0", 0, 64, GrantMode.READ, 30) == b""
    finally:
        open_owner.close()




def test_a_raw_write_past_its_grant_is_refused_and_the_bytes_outside_stay(
        owner: TransferEngine) -> None:
    segment_id = owner.local_descriptor("kv0").segment_id
    granted = owner.sign_grant("kv0", 1024, 256, GrantMode.WRITE, 30)
    expired = owner.sign_grant("kv0", 0, 4096, GrantMode.WRITE, -60)
    forged = _widened(granted, 4096)
    with authenticated_socket(owner.endpoint, TOKEN) as sock:
        sock.sendall(grant_frame(granted) + grant_frame(expired) + grant_frame(forged)
                     + pack_header(FrameOp.WRITE, 1, segment_id, 1024, 512) + b"\x55" * 512
                     + pack_header(FrameOp.WRITE, 2, segment_id, 0, 64) + b"\x66" * 64
                     + pack_header(FrameOp.WRITE, 3, segment_id, 1024, 256) + b"\x77" * 256
                     + pack_header(FrameOp.READ, 4, segment_id, 1000, 100))
        answers = [recv_frame(sock) for _ in range(4)]
    statuses = [(h.request_id, h.status) for h, _ in answers]
    assert statuses == [(1, ErrorCode.ACCESS_DENIED), (2, ErrorCode.ACCESS_DENIED), (3, 0),
                        (4, ErrorCode.ACCESS_DENIED)]
    assert b"last grant refused" in answers[0][1]
    view = bytes(owner._table.get("kv0").view)
    assert view[:1024] == b"\xee" * 1024
    assert view[1024:1280] == b"\x77" * 256
    assert view[1280:] == b"\xee" * (4096 - 1280)


def test_grants_expire_on_the_owner_s_clock(owner: TransferEngine,
                                            tcp_engine: MakeEngine) -> None:
    peer, remote = _reader(tcp_engine, owner)
    lapsed = owner.sign_grant("kv0", 0, 64, GrantMode.READ, -(CLOCK_SKEW_S + 1))
    buffer = peer.allocate_buffer(64)
    with pytest.raises(AccessDeniedError, match="expired"):
        peer.transfer([_request(peer, "r", remote, 0, buffer.view, lapsed)])
