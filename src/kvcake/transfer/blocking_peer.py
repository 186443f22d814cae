"""The TCP transport's frames on a blocking socket of the calling thread's, for small
transfers whose caller waits anyway (:meth:`TransferEngine.transfer_here`): no hop to the
engine's I/O thread and back. Same frames and grants as :mod:`kvcake.transfer.client`: a
READ reply lands straight in the caller's buffer, a WRITE sends it without a copy first,
a grant goes ahead of its first frame on the connection.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
from collections.abc import Sequence

from kvcake.common.auth import ClusterAuth
from kvcake.common.blocking_rpc import BlockingConnection, failure
from kvcake.common.errors import (
    AuthenticationError,
    KvcakeError,
    ProtocolError,
    TransferError,
    error_from_code,
)
from kvcake.common.frames import HEADER_SIZE, FrameOp, pack_header, unpack_header
from kvcake.common.rpc import MAX_ERROR_BYTES
from kvcake.common.sockets import ReplyWait, recv_bytes, recv_exactly
from kvcake.transfer.batch import TransferOp, TransferRequest
from kvcake.transfer.grants import PresentedGrants

Errors = list[KvcakeError | None]


class BlockingPeer:
    """One blocking connection to one peer's transfer server; one thread uses it.
    ``spin_s``: how long it polls for each reply before it sleeps (:class:`ReplyWait`)."""

    def __init__(self, endpoint: str, auth: ClusterAuth, timeout_s: float,
                 spin_s: float = 0.0) -> None:
        self.endpoint = endpoint
        self._timeout_s = timeout_s
        self._connection = BlockingConnection(endpoint, timeout_s, auth)
        self._grants = PresentedGrants()
        self._ids = itertools.count(1)
        self._header = memoryview(bytearray(HEADER_SIZE))
        self._wait = ReplyWait(spin_s)

    def move(self, requests: Sequence[TransferRequest]) -> Errors:
        """Send every request, then take every reply; each request's error (``None``:
        moved). A broken connection fails the requests not answered yet, and is dropped."""
        errors: Errors = [None] * len(requests)
        try:
            sock = self._connected()
        except AuthenticationError as exc:
            return [exc] * len(requests)  # as the engine's own connections say it
        except KvcakeError as exc:
            return [TransferError(f"cannot connect to peer {self.endpoint}: {exc}")] * \
                len(requests)
        pending = self._send(sock, requests)
        try:
            while pending:
                self._receive_one(sock, requests, pending, errors)
        except _RefusedError as refused:  # the peer refused the connection as a whole
            self.close()
            for index in pending.values():
                errors[index] = refused.error
        except (OSError, ProtocolError) as exc:
            self.close()
            broken = failure(self.endpoint, self._timeout_s, exc)
            error = TransferError(f"peer {self.endpoint}: {broken.args[0]}")
            for index in pending.values():
                errors[index] = error
        return errors

    def close(self) -> None:
        self._connection.close()

    def _connected(self) -> socket.socket:
        sock, fresh = self._connection.socket()
        if fresh:
            self._grants = PresentedGrants()  # a new connection holds none
        return sock

    def _send(self, sock: socket.socket, requests: Sequence[TransferRequest]) -> dict[int, int]:
        """Write every request's frames; request id -> index of the request."""
        pending: dict[int, int] = {}
        chunks: list[bytes | memoryview] = []
        for index, request in enumerate(requests):
            if request.grant and self._grants.needs_sending(request.grant):
                chunks += (pack_header(FrameOp.GRANT, 0, length=len(request.grant)),
                           request.grant)
            request_id = next(self._ids)
            pending[request_id] = index
            op = FrameOp.READ if request.op is TransferOp.READ else FrameOp.WRITE
            chunks.append(pack_header(op, request_id, request.segment.descriptor.segment_id,
                                      request.offset, request.length))
            if request.op is TransferOp.WRITE:
                chunks.append(request.buffer)
        with contextlib.suppress(OSError):  # then no reply comes either: the wait says so
            _send_all(sock, chunks)
        return pending

    def _receive_one(self, sock: socket.socket, requests: Sequence[TransferRequest],
                     pending: dict[int, int], errors: Errors) -> None:
        self._wait.recv_exactly(sock, self._header)
        header = unpack_header(self._header, max(MAX_ERROR_BYTES, _largest(requests)))
        if header.status:
            text = _receive_text(sock, header.length)
            error = error_from_code(header.status, f"peer {self.endpoint}: {text}")
            if header.request_id == 0:
                raise _RefusedError(error)
            errors[pending.pop(header.request_id)] = error
            return
        index = pending.pop(header.request_id, None)
        expected = FrameOp.READ_REPLY if index is not None and \
            requests[index].op is TransferOp.READ else FrameOp.WRITE_REPLY
        if index is None or header.op is not expected:
            raise ProtocolError(f"unexpected {header.op.name} #{header.request_id}")
        if header.op is FrameOp.READ_REPLY:
            if header.length != requests[index].length:
                raise ProtocolError(f"read reply of {header.length} bytes, asked "
                                    f"{requests[index].length}")
            recv_exactly(sock, requests[index].buffer)


class _RefusedError(Exception):
    """The peer's error frame for the whole connection (request id 0): it closes it."""

    def __init__(self, error: KvcakeError) -> None:
        super().__init__(error)
        self.error = error


def _largest(requests: Sequence[TransferRequest]) -> int:
    return max((r.length for r in requests if r.op is TransferOp.READ), default=0)


def _receive_text(sock: socket.socket, length: int) -> str:
    if length > MAX_ERROR_BYTES:
        raise ProtocolError(f"error message of {length} bytes")
    return recv_bytes(sock, length).decode(errors="replace")


def _send_all(sock: socket.socket, chunks: list[bytes | memoryview]) -> None:
    """``sendmsg`` until every chunk left (a partial send resumes where it stopped)."""
    views = [memoryview(c).cast("B") for c in chunks]
    while views:
        sent = sock.sendmsg(views[:512])  # IOV_MAX is 1024 on Linux
        while sent and views:
            if sent >= views[0].nbytes:
                sent -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
