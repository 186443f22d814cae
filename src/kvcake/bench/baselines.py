"""Baselines for the transfer benchmark: single-thread memcpy and a plain Python socket stream.

The socket peer runs in its own process, like the transfer peer, and moves the same sizes
with ``sendall`` / ``recv_into`` and nothing else: the best a Python TCP stream does here.
"""

from __future__ import annotations

import multiprocessing
import socket
import struct
from multiprocessing.connection import Connection

from kvcake.common.sockets import recv_exactly

_REQUEST = struct.Struct("<BQQ")  # mode, chunk bytes, chunk count
_EXIT, _CLIENT_WRITES, _CLIENT_READS = 0, 1, 2


def memcpy_step(dst: memoryview, src: memoryview, size: int, count: int) -> int:
    for i in range(count):
        dst[i * size : (i + 1) * size] = src[i * size : (i + 1) * size]
    return size * count


def _socket_peer(pipe: Connection, buffer_bytes: int) -> None:
    buffer = memoryview(bytearray(b"\x01" * buffer_bytes))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        pipe.send(listener.getsockname()[1])
        sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    header = memoryview(bytearray(_REQUEST.size))
    while True:
        recv_exactly(sock, header)
        mode, chunk, count = _REQUEST.unpack(header)
        if mode == _EXIT:
            break
        for i in range(count):
            window = buffer[(i * chunk) % buffer_bytes :][:chunk]
            if mode == _CLIENT_WRITES:
                recv_exactly(sock, window)
            else:
                sock.sendall(window)
        if mode == _CLIENT_WRITES:
            sock.sendall(b"k")
    sock.close()


class SocketBaseline:
    """A plain-socket peer process and the client end of its stream."""

    def __init__(self, buffer_bytes: int) -> None:
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self._process = context.Process(target=_socket_peer, args=(theirs, buffer_bytes))
        self._process.start()
        port = ours.recv()
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ack = memoryview(bytearray(1))

    def write(self, buffer: memoryview, size: int, count: int) -> int:
        self._sock.sendall(_REQUEST.pack(_CLIENT_WRITES, size, count))
        for i in range(count):
            self._sock.sendall(buffer[i * size : (i + 1) * size])
        recv_exactly(self._sock, self._ack)
        return size * count

    def read(self, buffer: memoryview, size: int, count: int) -> int:
        self._sock.sendall(_REQUEST.pack(_CLIENT_READS, size, count))
        for i in range(count):
            recv_exactly(self._sock, buffer[i * size : (i + 1) * size])
        return size * count

    def close(self) -> None:
        self._sock.sendall(_REQUEST.pack(_EXIT, 0, 0))
        self._sock.close()
        self._process.join(10)
