"""Raw sockets that speak kvcake frames, for tests that bend the protocol on purpose."""

from __future__ import annotations

import socket
from typing import Any

from kvcake.common.auth import ClientHandshake, ClusterAuth
from kvcake.common.codec import encode
from kvcake.common.frames import HEADER_SIZE, FrameHeader, FrameOp, pack_header, unpack_header
from kvcake.common.rpc import RpcClient


def authenticated_socket(endpoint: str, token: str) -> socket.socket:
    """A connection to ``endpoint`` (``HOST:PORT``) that has proved it holds ``token``."""
    host, port = endpoint.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    handshake = ClientHandshake(ClusterAuth(token))
    sock.sendall(pack_header(FrameOp.AUTH_HELLO, 0, length=32) + handshake.hello())
    header, challenge = recv_frame(sock)
    assert header.op is FrameOp.AUTH_CHALLENGE
    sock.sendall(pack_header(FrameOp.AUTH_PROOF, 0, length=32) + handshake.proof(challenge))
    return sock


def recv_frame(sock: socket.socket) -> tuple[FrameHeader, bytes]:
    """One whole frame: its header and payload."""
    raw = b""
    while len(raw) < HEADER_SIZE:
        chunk = sock.recv(HEADER_SIZE - len(raw))
        assert chunk, "server closed without answering"
        raw += chunk
    header = unpack_header(raw, 1 << 30)
    payload = b""
    while len(payload) < header.payload_size:
        chunk = sock.recv(header.payload_size - len(payload))
        assert chunk, "server closed mid-payload"
        payload += chunk
    return header, payload


def grant_frame(blob: bytes) -> bytes:
    return pack_header(FrameOp.GRANT, 0, length=len(blob)) + blob


def read_reply(sock: socket.socket) -> str:
    """One HTTP reply, whole: its head, then the body its Content-Length announces."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "server closed before its reply's head"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "server closed mid-body"
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


async def call_once(endpoint: str, message: Any, timeout_s: float = 5.0) -> bytes:
    """One RPC call of ``message`` to ``endpoint`` on a connection of its own; the reply."""
    client = RpcClient(endpoint, timeout_s)
    try:
        return await client.call(encode(message))
    finally:
        client.close()
