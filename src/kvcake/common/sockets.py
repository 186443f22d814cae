"""Blocking-socket helpers for the few places that do not run on an event loop."""

from __future__ import annotations

import socket


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` with ``recv_into`` (no intermediate bytes objects)."""
    got = 0
    while got < view.nbytes:
        count = sock.recv_into(view[got:])
        if count == 0:
            raise ConnectionError("peer closed the connection mid-message")
        got += count


def recv_bytes(sock: socket.socket, size: int) -> bytearray:
    """The next ``size`` bytes from ``sock``."""
    data = bytearray(size)
    if size:
        recv_exactly(sock, memoryview(data))
    return data


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (bound on ``host``:0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port
