"""The RPC client of :mod:`kvcake.common.rpc` on a blocking socket, for a caller that waits
anyway: the call runs in the caller's own thread, with no hop to an event loop and back.

One thread at a time per client (give each thread its own); within it, requests whose
replies are taken later (:meth:`BlockingRpcClient.send`, :meth:`BlockingRpcClient.begin`)
may be outstanding beside a call. Same frames, same cluster-token
handshake, same errors as :class:`kvcake.common.rpc.RpcClient`: a server that cannot be
reached, breaks the protocol or outlives ``timeout_s`` raises :class:`KvcakeError`
(``RPC_FAIL``), and :attr:`BlockingRpcClient.sent` then says whether the request may have
reached the server (a caller must not resend such a request to the same server blindly).
"""

from __future__ import annotations

import contextlib
import itertools
import select
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from kvcake.common.auth import ClientHandshake, ClusterAuth, cluster_auth, refusal
from kvcake.common.errors import (
    AuthenticationError,
    ErrorCode,
    KvcakeError,
    ProtocolError,
    error_from_code,
)
from kvcake.common.frames import HEADER_SIZE, FrameHeader, FrameOp, pack_header, unpack_header
from kvcake.common.rpc import MAX_CALL_BYTES, MAX_ERROR_BYTES
from kvcake.common.sockets import ReplyWait, kernel_timeouts, recv_bytes, recv_exactly


class Closable(Protocol):
    def close(self) -> None: ...


V = TypeVar("V", bound=Closable)


class BlockingRpcClient:
    """One blocking connection to an RPC server, opened on first use and again after a
    loss (checked before each call: a server that closed it is reconnected, not failed).
    ``spin_s``: how long a call polls for its reply before it sleeps (:class:`ReplyWait`)."""

    def __init__(self, endpoint: str, timeout_s: float, auth: ClusterAuth | None = None,
                 spin_s: float = 0.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.auth = auth if auth is not None else cluster_auth()
        self.sent = False  # whether the last call's request left this process
        self._connection = BlockingConnection(endpoint, timeout_s, self.auth)
        self._ids = itertools.count(1)
        self._header = memoryview(bytearray(HEADER_SIZE))
        self._wait = ReplyWait(spin_s)
        self._unanswered: dict[int, Callable[[bytes | KvcakeError], None]] = {}

    def call(self, body: bytes) -> bytes:
        """Send one request; its reply's body (a server's error raises its code)."""
        return self.begin(body)()

    def send(self, body: bytes, on_reply: Callable[[bytes | KvcakeError], None]) -> None:
        """Send one request and return at once; its reply (or error) goes to ``on_reply``
        once read: before this client's next request, if it has arrived by then, else by
        the next :meth:`call`; or the error that broke the connection first. Raises as
        :meth:`call` does when the request could not be sent."""
        _, request_id = self._send(body)
        self._unanswered[request_id] = on_reply

    def begin(self, body: bytes) -> Callable[[], bytes]:
        """Send one request and return at once; what it returns waits for the reply and
        gives its body, as :meth:`call` would. Other requests may go on this client
        meanwhile: their replies are told apart by id. Raises as :meth:`call` does when the
        request could not be sent (:attr:`sent` is then false)."""
        replies: list[bytes | KvcakeError] = []
        _, request_id = self._send(body)
        self._unanswered[request_id] = replies.append

        def reply() -> bytes:
            self._read_until_answered(request_id)
            answer = replies[0]
            if isinstance(answer, KvcakeError):
                raise answer
            return answer
        return reply

    def _read_until_answered(self, request_id: int) -> None:
        """Read replies until the one to ``request_id`` has gone to its taker (an error
        there once the connection broke)."""
        try:
            while request_id in self._unanswered:
                sock = self._connection.current
                if sock is None:  # closed meanwhile (close() from another thread)
                    self._fail_unanswered()
                    return
                header, payload = self._read_reply(sock)
                if header.request_id == 0 and header.status:  # the connection refused
                    self._connection.close()
                    self._fail_unanswered(self._refusal(header, payload))
                elif not self._answered(header, payload):
                    raise ProtocolError(f"unexpected reply #{header.request_id}")
        except (OSError, ProtocolError) as exc:
            self._connection.close()
            self._fail_unanswered(self._failure(exc))

    def close(self) -> None:
        """Close the connection; unanswered sends whose replies have arrived get them, the
        others an error."""
        with contextlib.suppress(OSError, ProtocolError):
            self._read_arrived_replies()
        self._connection.close()
        self._fail_unanswered()

    def _send(self, body: bytes) -> tuple[socket.socket, int]:
        self.sent = False
        self._take_arrived_replies()
        try:
            sock, fresh = self._connection.socket()
        except KvcakeError:
            self._fail_unanswered()  # the old connection is gone, and their replies with it
            raise
        if fresh:
            self._fail_unanswered()  # their replies went with the old connection
        request_id = next(self._ids)
        try:
            sock.sendall(pack_header(FrameOp.CALL, request_id, length=len(body)) + body)
        except OSError as exc:
            self.close()
            raise self._failure(exc) from None
        self.sent = True
        return sock, request_id

    def _fail_unanswered(self, error: KvcakeError | None = None) -> None:
        """Hand every request still waiting for a reply its own copy of ``error`` (default:
        the connection was lost)."""
        unanswered, self._unanswered = self._unanswered, {}
        for on_reply in unanswered.values():
            if error is None:
                on_reply(KvcakeError(f"connection to {self.endpoint} lost before the reply",
                                     ErrorCode.RPC_FAIL))
            else:
                on_reply(error_from_code(error.code, error.args[0]))

    # ----- receiving
    def _read_reply(self, sock: socket.socket) -> tuple[FrameHeader, bytes]:
        header = self._receive_header(sock)
        return header, bytes(recv_bytes(sock, self._payload_size(header)))

    def _answered(self, header: FrameHeader, payload: bytes) -> bool:
        """Whether this reply was to a request :meth:`send` sent (then handed to it)."""
        on_reply = self._unanswered.pop(header.request_id, None)
        if on_reply is not None:
            on_reply(self._refusal(header, payload) if header.status else payload)
        return on_reply is not None

    def _take_arrived_replies(self) -> None:
        """Read the replies to :meth:`send`'s requests that have arrived already. Left
        unread, they would hide a close that came after them from the check before the
        next call: a server that answered and then went away would look alive, and the call
        would be lost with the connection."""
        try:
            self._read_arrived_replies()
        except (OSError, ProtocolError):
            self.close()  # the next call opens a new connection

    def _read_arrived_replies(self) -> None:
        sock = self._connection.current
        while sock is not None and self._unanswered and _frame_waiting(sock):
            header, payload = self._read_reply(sock)
            if not self._answered(header, payload):
                raise ProtocolError(f"unexpected reply #{header.request_id}")

    def _refusal(self, header: FrameHeader, payload: bytes) -> KvcakeError:
        return error_from_code(header.status,
                               f"{self.endpoint}: {payload.decode(errors='replace')}")

    def _receive_header(self, sock: socket.socket) -> FrameHeader:
        self._wait.recv_exactly(sock, self._header)
        return unpack_header(self._header, MAX_CALL_BYTES)

    @staticmethod
    def _payload_size(header: FrameHeader) -> int:
        if header.op is not FrameOp.CALL_REPLY:
            raise ProtocolError(f"unexpected {header.op.name} frame from an RPC server")
        return _checked_length(header)

    def _failure(self, exc: Exception) -> KvcakeError:
        return failure(self.endpoint, self.timeout_s, exc)


class BlockingConnection:
    """A blocking socket to one frame server: opened when first needed, and again once the
    server closed it (checked before each use); closed by :meth:`close`, or with this object
    at the latest (a thread's connection goes with the thread), never left to the socket's
    own finalizer."""

    def __init__(self, endpoint: str, timeout_s: float, auth: ClusterAuth) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.auth = auth
        self._sock: socket.socket | None = None
        self._closer = weakref.finalize(self, _nothing)

    @property
    def current(self) -> socket.socket | None:
        """The socket as it is (not checked, not reopened)."""
        return self._sock

    def socket(self) -> tuple[socket.socket, bool]:
        """The open socket, and whether it was opened just now (see :func:`open_blocking`
        for its errors)."""
        if self._sock is not None and not peer_closed(self._sock):
            return self._sock, False
        self.close()
        self._sock = open_blocking(self.endpoint, self.timeout_s, self.auth)
        self._closer = weakref.finalize(self, self._sock.close)
        return self._sock, True

    def close(self) -> None:
        self._sock = None
        self._closer()


class PerThread(Generic[V]):
    """Each thread's own value per key (``make(key)``: a blocking connection per thread
    and server); :meth:`close` closes every value made, in every thread."""

    def __init__(self, make: Callable[[str], V]) -> None:
        self._make = make
        self._local = threading.local()
        self._made: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def get(self, key: str) -> V:
        values: dict[str, V] | None = getattr(self._local, "values", None)
        if values is None:
            values = self._local.values = {}
        value = values.get(key)
        if value is None:
            value = values[key] = self._make(key)
            with self._lock:
                self._made.add(value)
        return value

    def close(self) -> None:
        with self._lock:
            made = list(self._made)
        for value in made:
            value.close()


def _nothing() -> None:
    pass


def open_blocking(endpoint: str, timeout_s: float, auth: ClusterAuth) -> socket.socket:
    """A blocking socket connected to the frame server at ``endpoint`` (``HOST:PORT``),
    past the cluster-token handshake when ``auth`` has a token; each send and receive
    bounded by ``timeout_s`` (by the kernel). Raises ``KvcakeError`` (``RPC_FAIL``) when the
    server cannot be reached, :class:`AuthenticationError` when it refuses us (or we it)."""
    host, _, port = endpoint.rpartition(":")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout_s)
    except (OSError, ValueError) as exc:
        raise KvcakeError(f"cannot reach {endpoint}: {exc or type(exc).__name__}",
                          ErrorCode.RPC_FAIL) from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        kernel_timeouts(sock, timeout_s)
        if auth.enabled:
            _authenticate(sock, endpoint, timeout_s, auth)
    except BaseException:
        sock.close()
        raise
    return sock


def _authenticate(sock: socket.socket, endpoint: str, timeout_s: float,
                  auth: ClusterAuth) -> None:
    handshake = ClientHandshake(auth)
    hello = handshake.hello()
    header_buffer = memoryview(bytearray(HEADER_SIZE))
    try:
        sock.sendall(pack_header(FrameOp.AUTH_HELLO, 0, length=len(hello)) + hello)
        recv_exactly(sock, header_buffer)
        header = unpack_header(header_buffer, MAX_ERROR_BYTES)
        body = recv_bytes(sock, _checked_length(header))
    except (OSError, ProtocolError) as exc:
        raise failure(endpoint, timeout_s, exc) from None
    if header.status:
        raise refusal(endpoint, header.status, body.decode(errors="replace"))
    if header.op is not FrameOp.AUTH_CHALLENGE:
        raise AuthenticationError(f"{endpoint} answered the hello with {header.op.name}")
    try:
        proof = handshake.proof(bytes(body))
    except AuthenticationError as exc:
        raise AuthenticationError(f"{endpoint}: {exc.args[0]}") from None
    try:
        sock.sendall(pack_header(FrameOp.AUTH_PROOF, 0, length=len(proof)) + proof)
    except OSError as exc:
        raise failure(endpoint, timeout_s, exc) from None


def _checked_length(header: FrameHeader) -> int:
    if header.status and header.length > MAX_ERROR_BYTES:
        raise ProtocolError(f"error message of {header.length} bytes")
    return header.length


def failure(endpoint: str, timeout_s: float, exc: Exception) -> KvcakeError:
    """The ``RPC_FAIL`` error for a blocking exchange with ``endpoint`` that broke."""
    if isinstance(exc, TimeoutError | BlockingIOError):  # a Python or a kernel timeout
        return KvcakeError(f"no reply from {endpoint} within {timeout_s}s", ErrorCode.RPC_FAIL)
    if isinstance(exc, ProtocolError):
        return KvcakeError(f"{endpoint} broke the protocol: {exc}", ErrorCode.RPC_FAIL)
    return KvcakeError(f"connection to {endpoint} lost: {exc or type(exc).__name__}",
                       ErrorCode.RPC_FAIL)


def _frame_waiting(sock: socket.socket) -> bool:
    """Whether a whole frame header is ready to read on ``sock`` (without waiting)."""
    try:
        return len(sock.recv(HEADER_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)) == HEADER_SIZE
    except BlockingIOError:
        return False


def peer_closed(sock: socket.socket) -> bool:
    """Whether the server closed (or reset) an idle connection since its last reply."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True
