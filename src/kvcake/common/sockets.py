"""Blocking-socket helpers for the few places that do not run on an event loop."""

from __future__ import annotations

import os
import socket
import struct
import time


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


class ReplyWait:
    """Receiving replies on one blocking socket: poll for a while, then sleep.

    A thread that blocks in ``recv`` sleeps until the kernel wakes it as the reply lands;
    on a VM that wake-up costs tens of microseconds, as much as a small call's whole round
    trip. So for up to ``spin_s`` the wait polls the socket instead (a non-blocking
    ``recv_into``, yielding the CPU between tries), and only then blocks. It polls only
    while this connection's replies have been coming within that budget (their running
    average, :attr:`typical_s`): where they take longer, polling gains nothing and burns a
    CPU. ``spin_s`` 0: always block.
    """

    def __init__(self, spin_s: float) -> None:
        self.spin_s = spin_s
        self.typical_s = 0.0  # running average of how long a reply took to arrive

    @property
    def polls(self) -> bool:
        return self.spin_s > 0 and self.typical_s <= self.spin_s

    def recv_exactly(self, sock: socket.socket, view: memoryview) -> None:
        """:func:`recv_exactly`, polling first when replies have been quick."""
        start = time.perf_counter()
        got = _poll_into(sock, view, start + self.spin_s) if self.polls else 0
        if got < view.nbytes:
            recv_exactly(sock, view[got:])
        self.note(time.perf_counter() - start)

    def note(self, waited_s: float) -> None:
        """Count one reply that took ``waited_s`` to arrive."""
        self.typical_s += (waited_s - self.typical_s) / 8


def _poll_into(sock: socket.socket, view: memoryview, deadline: float) -> int:
    """What a non-blocking ``recv_into`` got before ``deadline`` (0: nothing yet)."""
    while True:
        try:
            count = sock.recv_into(view, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if time.perf_counter() >= deadline:
                return 0
            os.sched_yield()
            continue
        if count == 0 and view.nbytes:
            raise ConnectionError("peer closed the connection mid-message")
        return count


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
