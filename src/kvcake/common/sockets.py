"""Blocking-socket helpers for the few places that do not run on an event loop."""

from __future__ import annotations

import socket
import struct


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` with ``recv_into`` (no intermediate bytes objects); on a
    blocking socket (:func:`kernel_timeouts`) one system call, however many segments the
    bytes came in."""
    got = 0
    while got < view.nbytes:
        count = sock.recv_into(view[got:], 0, socket.MSG_WAITALL)
        if count == 0:
            raise ConnectionError("peer closed the connection mid-message")
        got += count


def kernel_timeouts(sock: socket.socket, timeout_s: float) -> None:
    """Make ``sock`` blocking with its timeouts kept by the kernel (``SO_RCVTIMEO``,
    ``SO_SNDTIMEO``): each send or receive is then one system call, where a socket with a
    Python timeout polls before every one. A timed-out call raises
    :class:`BlockingIOError` where a Python timeout raises :class:`TimeoutError`."""
    seconds = int(timeout_s)
    timeval = struct.pack("ll", seconds, int((timeout_s - seconds) * 1e6))
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


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
