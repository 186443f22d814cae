"""The cluster token: reading it, the handshake halves, and RPC servers that require it."""

from __future__ import annotations

import asyncio
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from kvcake.common.auth import (
    NO_AUTH,
    ClientHandshake,
    ClusterAuth,
    HandshakeStep,
    ServerHandshake,
    cluster_auth,
    use_cluster_token,
)
from kvcake.common.config import read_cluster_token
from kvcake.common.errors import (
    AuthenticationError,
    ErrorCode,
    InvalidParamsError,
    KvcakeError,
)
from kvcake.common.frames import HEADER_SIZE, FrameOp, pack_header, unpack_header
from kvcake.common.rpc import RpcClient, RpcServer

TOKEN = "t0ken-" + "a" * 26
OTHER = "t0ken-" + "b" * 26


# ----- reading the token
def test_token_from_file_wins_over_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert read_cluster_token(str(path), {"KVCAKE_CLUSTER_TOKEN": OTHER}) == TOKEN
    assert read_cluster_token(None, {"KVCAKE_CLUSTER_TOKEN": OTHER}) == OTHER
    assert read_cluster_token(None, {}) == ""


@pytest.mark.parametrize(("content", "message"), [
    ("", "is empty"), ("short", "has 5 characters"), ("\n\n", "is empty")])
def test_bad_token_files_are_refused_without_quoting_them(tmp_path: Path, content: str,
                                                           message: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(InvalidParamsError, match=message) as caught:
        read_cluster_token(str(path), {})
    assert "short" not in str(caught.value).replace("has 5", "")


def test_missing_token_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidParamsError, match="cannot read cluster token file"):
        read_cluster_token(str(tmp_path / "absent"), {})


def test_process_credentials_come_from_the_cli_else_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvcake.common.auth._configured", None)
    monkeypatch.setenv("KVCAKE_CLUSTER_TOKEN", TOKEN)
    assert cluster_auth() == ClusterAuth(TOKEN)
    use_cluster_token(OTHER)
    assert cluster_auth() == ClusterAuth(OTHER)


def test_the_cli_refuses_an_unreadable_token_file(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from kvcake.cli import main

    assert main(["master", "--cluster-token-file", str(tmp_path / "absent")]) == 2
    assert "cannot read cluster token file" in capsys.readouterr().err


def test_kvcake_up_hands_the_given_token_to_its_children_in_a_private_file(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcake.cluster.up import Cluster, ClusterSpec

    monkeypatch.setattr("kvcake.common.auth._configured", None)
    use_cluster_token(TOKEN)  # as --cluster-token-file does
    cluster = Cluster(ClusterSpec(store_size="0"))
    cluster.hand_over_token()
    path = Path(cluster.token.path)
    assert path.read_text() == TOKEN and cluster.token.origin == "the given"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    cluster.stop()
    assert not path.exists()


def test_kvcake_up_generates_a_token_unless_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcake.cluster.up import Cluster, ClusterSpec

    monkeypatch.setattr("kvcake.common.auth._configured", None)
    monkeypatch.delenv("KVCAKE_CLUSTER_TOKEN", raising=False)
    tokens = []
    for _ in range(2):
        cluster = Cluster(ClusterSpec(store_size="0"))
        cluster.hand_over_token()
        tokens.append(Path(cluster.token.path).read_text())
        assert cluster.authenticated and cluster.token.origin == "a generated"
        cluster.stop()
    assert all(len(t) == 64 for t in tokens) and tokens[0] != tokens[1]
    bare = Cluster(ClusterSpec(store_size="0", no_token=True))
    bare.hand_over_token()
    assert not bare.authenticated and bare.token.path == ""


def test_the_token_never_shows_in_repr() -> None:
    assert TOKEN not in repr(ClusterAuth(TOKEN))


# ----- the handshake, without I/O
def test_matching_tokens_complete_the_handshake_both_ways() -> None:
    server, client = ServerHandshake(ClusterAuth(TOKEN)), ClientHandshake(ClusterAuth(TOKEN))
    challenge = server.hello(client.hello())
    assert server.step is HandshakeStep.PROOF
    server.proof(client.proof(challenge))
    assert server.step is HandshakeStep.DONE


def test_a_client_with_another_token_rejects_the_server() -> None:
    server, client = ServerHandshake(ClusterAuth(TOKEN)), ClientHandshake(ClusterAuth(OTHER))
    with pytest.raises(AuthenticationError, match="different cluster token"):
        client.proof(server.hello(client.hello()))


def test_a_forged_or_replayed_proof_is_refused() -> None:
    first = ServerHandshake(ClusterAuth(TOKEN))
    client = ClientHandshake(ClusterAuth(TOKEN))
    proof = client.proof(first.hello(client.hello()))
    second = ServerHandshake(ClusterAuth(TOKEN))  # a new connection has a fresh nonce
    second.hello(client.hello())
    with pytest.raises(AuthenticationError, match="wrong cluster token"):
        second.proof(proof)
    with pytest.raises(AuthenticationError, match="wrong cluster token"):
        first.proof(b"\0" * 32)


def test_steps_out_of_order_are_refused() -> None:
    server = ServerHandshake(ClusterAuth(TOKEN))
    with pytest.raises(AuthenticationError, match="a proof while expecting the hello"):
        server.proof(b"\0" * 32)
    with pytest.raises(AuthenticationError, match="32-byte nonce"):
        server.hello(b"short")


# ----- RPC servers with a token
Scenario = Callable[[str], Awaitable[None]]


def _with_server(auth: ClusterAuth, scenario: Scenario) -> None:
    """Run ``scenario(endpoint)`` against an echo-reversed RPC server that requires ``auth``."""
    async def main() -> None:
        server = RpcServer(lambda payload: bytes(payload)[::-1], "127.0.0.1", 0, auth)
        endpoint = await server.startup()
        try:
            await scenario(endpoint)
        finally:
            await server.shutdown()
    asyncio.run(main())


async def _call(endpoint: str, auth: ClusterAuth) -> bytes:
    client = RpcClient(endpoint, 5.0, auth)
    try:
        return await client.call(b"hello")
    finally:
        client.close()


def test_rpc_with_the_token_is_served() -> None:
    async def scenario(endpoint: str) -> None:
        assert await _call(endpoint, ClusterAuth(TOKEN)) == b"olleh"
    _with_server(ClusterAuth(TOKEN), scenario)


@pytest.mark.parametrize(("auth", "message"), [
    (NO_AUTH, "requires the cluster token"),
    (ClusterAuth(OTHER), "holds a different cluster token"),
])
def test_rpc_without_the_token_gets_a_clear_error_and_the_server_serves_on(
        auth: ClusterAuth, message: str) -> None:
    async def scenario(endpoint: str) -> None:
        with pytest.raises(AuthenticationError, match=message) as caught:
            await _call(endpoint, auth)
        assert caught.value.code is ErrorCode.UNAUTHENTICATED
        assert TOKEN not in str(caught.value) and OTHER not in str(caught.value)
        assert await _call(endpoint, ClusterAuth(TOKEN)) == b"olleh"
    _with_server(ClusterAuth(TOKEN), scenario)


def test_a_token_against_a_server_without_one_is_a_clear_error() -> None:
    async def scenario(endpoint: str) -> None:
        with pytest.raises(AuthenticationError, match="does not take a cluster token"):
            await _call(endpoint, ClusterAuth(TOKEN))
        assert await _call(endpoint, NO_AUTH) == b"olleh"
    _with_server(NO_AUTH, scenario)


def _raw_exchange(endpoint: str, data: bytes) -> list[tuple[FrameOp, int, int, bytes]]:
    """Send ``data``; every frame answered (op, status, request id, payload) until the
    server closed the connection."""
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    frames = []
    while raw:
        header = unpack_header(raw[:HEADER_SIZE], 1 << 20)
        body, raw = raw[HEADER_SIZE:HEADER_SIZE + header.length], raw[HEADER_SIZE + header.length:]
        frames.append((header.op, header.status, header.request_id, body))
    return frames


_HELLO = pack_header(FrameOp.AUTH_HELLO, 0, length=32) + b"\0" * 32


@pytest.mark.parametrize(("data", "challenged"), [
    (pack_header(FrameOp.CALL, 5, length=2) + b"hi", False),
    (pack_header(FrameOp.AUTH_PROOF, 0, length=32) + b"\0" * 32, False),
    (pack_header(FrameOp.AUTH_HELLO, 0, length=1 << 20), False),
    (_HELLO + pack_header(FrameOp.CALL, 6, length=2) + b"hi", True),
    (_HELLO + pack_header(FrameOp.AUTH_PROOF, 0, length=32) + b"\0" * 32
     + pack_header(FrameOp.CALL, 6, length=2) + b"hi", True),
])
def test_raw_frames_before_authentication_get_one_error_and_a_close(
        data: bytes, challenged: bool) -> None:
    async def scenario(endpoint: str) -> None:
        frames = await asyncio.to_thread(_raw_exchange, endpoint, data)
        if challenged:
            assert frames.pop(0)[:3] == (FrameOp.AUTH_CHALLENGE, 0, 0)
        [(op, status, request_id, message)] = frames  # nothing is served after the error
        assert (op, status, request_id) == (FrameOp.CALL_REPLY, ErrorCode.UNAUTHENTICATED, 0)
        assert b"requires the cluster token" in message
        assert await _call(endpoint, ClusterAuth(TOKEN)) == b"olleh"
    _with_server(ClusterAuth(TOKEN), scenario)


def test_an_authenticated_client_reconnects_after_losing_its_connection() -> None:
    async def scenario(endpoint: str) -> None:
        client = RpcClient(endpoint, 5.0, ClusterAuth(TOKEN))
        try:
            assert await client.call(b"ab") == b"ba"
            connection = client._connection
            assert connection is not None and connection.transport is not None
            connection.transport.abort()
            await asyncio.sleep(0.01)
            assert await client.call(b"cd") == b"dc"
        finally:
            client.close()
    _with_server(ClusterAuth(TOKEN), scenario)


def test_kvcake_error_is_the_root() -> None:
    assert issubclass(AuthenticationError, KvcakeError)
