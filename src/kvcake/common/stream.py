"""asyncio drivers for kvcake's framed connections, shared by every server and client.

:class:`FramedProtocol` feeds a connection's bytes to a sans-I/O :class:`FrameReceiver`
(payloads land where the subclass's ``payload_buffer`` says); subclasses implement the
:class:`FrameSink` half. :class:`FramedServerConnection` adds what every server does: replies
made while one socket read is parsed leave in one ``writev`` (across veth this alone took
64 KiB reads from 8k to 20k objects/s), and a malformed frame is answered with an error frame
and ends that connection only. :class:`FrameListener` is the listening socket's lifecycle.

With a cluster token (:mod:`kvcake.common.auth`) a server connection starts with an
authentication gate as its receiver's sink: it answers the handshake and hands the
connection to the subclass once the peer proved itself, so the subclass never sees an
unauthenticated frame and authenticated frames pay nothing. :func:`authenticate` is the
client's half, awaited right after connecting.

A listener may poll (:class:`ReadPoller`): after a read, while requests have been coming
faster than ``poll_s`` apart, the loop checks its connections for the next one for up to
``poll_s`` before it sleeps. A sleeping process is woken by the sender's kernel, and on a VM
that costs the sender about as much as the rest of a small call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import cast

from kvcake.common.aio import set_nodelay
from kvcake.common.auth import (
    AUTH_TIMEOUT_S,
    HOW_TO_SET,
    MAX_AUTH_PAYLOAD,
    ClientHandshake,
    ClusterAuth,
    HandshakeStep,
    ServerHandshake,
    cluster_auth,
    refusal,
)
from kvcake.common.errors import AuthenticationError, ErrorCode, KvcakeError, ProtocolError
from kvcake.common.frames import FrameHeader, FrameOp, FrameReceiver, pack_header
from kvcake.common.log import get_logger

log = get_logger(__name__)

MAX_ERROR_MESSAGE_BYTES = 4096


def error_frame(op: FrameOp, request_id: int, error: KvcakeError) -> tuple[bytes, bytes]:
    """Header and UTF-8 message of a reply that failed with ``error``."""
    message = str(error.args[0]).encode()[:MAX_ERROR_MESSAGE_BYTES]
    return pack_header(op, request_id, length=len(message), status=error.code), message


class FramedProtocol(asyncio.BufferedProtocol, ABC):
    """One framed connection; subclasses define ``payload_buffer``, ``frame_received`` and
    ``protocol_error`` (the peer broke the framing)."""

    def __init__(self, max_payload: int) -> None:
        self.receiver = FrameReceiver(self, max_payload)
        self.transport: asyncio.Transport | None = None
        self.auth_waiter: asyncio.Future[None] | None = None  # set while authenticating

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        set_nodelay(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.receiver.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.receiver.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.protocol_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        waiter = self.auth_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(KvcakeError(
                f"connection closed during authentication: {exc or 'by the server'}",
                ErrorCode.RPC_FAIL))

    @abstractmethod
    def protocol_error(self, error: ProtocolError) -> None:
        ...

    @abstractmethod
    def payload_buffer(self, header: FrameHeader) -> memoryview | None:
        ...

    @abstractmethod
    def frame_received(self, header: FrameHeader, payload: memoryview | None) -> None:
        ...


class ReadPoller:
    """A listener's connections, polled for a moment after each read (see the module doc).
    ``gap_s`` is a running average of the time between reads (on ``clock``); polling starts
    once it is within ``poll_s`` and stops when it grows past, so an idle or slow server
    sleeps."""

    def __init__(self, poll_s: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.poll_s = poll_s
        self.gap_s = 1.0
        self._clock = clock
        self._epoll = select.epoll()
        self._owners: dict[int, object] = {}  # fd -> its connection (fds are reused)
        self._last_read = clock()
        self._scheduled = False

    def add(self, connection: object, transport: asyncio.BaseTransport) -> int:
        sock = transport.get_extra_info("socket")
        if sock is None:
            return -1
        fd: int = sock.fileno()
        with contextlib.suppress(OSError):
            self._epoll.register(fd, select.EPOLLIN)
            self._owners[fd] = connection
        return fd

    def remove(self, connection: object, fd: int) -> None:
        if self._owners.get(fd) is connection:
            del self._owners[fd]
            with contextlib.suppress(OSError, ValueError):  # closed: gone from the set
                self._epoll.unregister(fd)

    def __len__(self) -> int:
        return len(self._owners)

    @property
    def polling(self) -> bool:
        """Whether reads have been coming fast enough to poll for the next."""
        return self.gap_s <= self.poll_s

    def after_read(self) -> None:
        now = self._clock()
        self.gap_s = 0.75 * self.gap_s + 0.25 * (now - self._last_read)
        self._last_read = now
        if self.polling and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._poll)

    def _poll(self) -> None:
        """Return once a connection has bytes (the loop then reads them at once), or after
        ``poll_s``."""
        self._scheduled = False
        if self._epoll.closed:  # the listener shut down meanwhile
            return
        deadline = time.perf_counter() + self.poll_s
        while not self._epoll.poll(0) and time.perf_counter() < deadline:
            os.sched_yield()  # a thread with work of its own goes first

    def close(self) -> None:
        self._epoll.close()


class FramedServerConnection(FramedProtocol):
    """Server side: tracked in ``live`` (for shutdown), replies batched per socket read."""

    def __init__(self, max_payload: int, live: set[FramedServerConnection]) -> None:
        super().__init__(max_payload)
        self._live = live
        self._out: list[bytes | memoryview] | None = None  # set while a read is parsed
        self.auth: ClusterAuth | None = None  # set by the listener before the connection
        self.poller: ReadPoller | None = None  # likewise
        self.authenticated = False
        self._auth_timer: asyncio.TimerHandle | None = None
        self._fd = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._live.add(self)
        if self.poller is not None:
            self._fd = self.poller.add(self, transport)
        if self.auth is not None and self.auth.enabled:
            gate = _ServerGate(self, ServerHandshake(self.auth))
            self.receiver.sink = gate
            self._auth_timer = asyncio.get_running_loop().call_later(AUTH_TIMEOUT_S,
                                                                     gate.expire)
        else:
            self.authenticated = True

    def admit(self) -> None:
        """The peer proved itself: frames from now on reach the subclass."""
        self.authenticated = True
        self.receiver.sink = self
        self._stop_auth_timer()

    def _stop_auth_timer(self) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None

    def buffer_updated(self, nbytes: int) -> None:
        self._out = []
        try:
            super().buffer_updated(nbytes)
        finally:
            out, self._out = self._out, None
            if out and self.transport is not None:
                self.transport.writelines(out)
            if self.poller is not None:
                self.poller.after_read()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._live.discard(self)
        self._stop_auth_timer()
        if self.poller is not None:
            self.poller.remove(self, self._fd)

    def send(self, *chunks: bytes | memoryview) -> None:
        """Queue with this read's other replies, or write now (a reply finished later)."""
        if self._out is not None:
            self._out.extend(chunks)
        elif self.transport is not None:
            self.transport.writelines(chunks)

    def reply_error(self, op: FrameOp, request_id: int, error: KvcakeError) -> None:
        self.send(*error_frame(op, request_id, error))

    def protocol_error(self, error: ProtocolError) -> None:
        log.warning("closing connection after a malformed frame: %s", error)
        self.reply_error(FrameOp.CALL_REPLY, 0, error)
        self.close()  # the transport flushes the error reply first

    def close(self) -> None:
        if self.transport is not None:
            if self._out:  # replies queued in this read go out before the close
                self.transport.writelines(self._out)
                self._out = []
            self.transport.close()


class _ServerGate:
    """A server connection's sink until its peer authenticated (see the module doc)."""

    def __init__(self, connection: FramedServerConnection, handshake: ServerHandshake) -> None:
        self._connection = connection
        self._handshake = handshake
        self._refused = False

    def payload_buffer(self, header: FrameHeader) -> memoryview | None:
        if self._admissible(header) and header.length <= MAX_AUTH_PAYLOAD:
            return memoryview(bytearray(header.length))
        self.refuse(f"{header.op.name} frame before authentication")
        return None  # dropped; the connection is closing

    def frame_received(self, header: FrameHeader, payload: memoryview | None) -> None:
        if self._refused:
            return
        if not self._admissible(header):
            self.refuse(f"{header.op.name} frame before authentication")
            return
        try:
            self._step(header.op, bytes(payload or b""))
        except AuthenticationError as exc:
            self.refuse(str(exc.args[0]))

    def _admissible(self, header: FrameHeader) -> bool:
        wanted = (FrameOp.AUTH_HELLO if self._handshake.step is HandshakeStep.HELLO
                  else FrameOp.AUTH_PROOF)
        return not self._refused and header.op is wanted

    def _step(self, op: FrameOp, payload: bytes) -> None:
        if op is FrameOp.AUTH_HELLO:
            challenge = self._handshake.hello(payload)
            self._connection.send(pack_header(FrameOp.AUTH_CHALLENGE, 0, length=len(challenge)),
                                  challenge)
            return
        self._handshake.proof(payload)
        self._connection.admit()

    def refuse(self, why: str) -> None:
        if self._refused:
            return
        self._refused = True
        log.warning("refused an unauthenticated connection: %s", why)
        error = AuthenticationError(f"this server requires the cluster token ({HOW_TO_SET}): "
                                    f"{why}")
        self._connection.reply_error(FrameOp.CALL_REPLY, 0, error)
        self._connection.close()

    def expire(self) -> None:
        if not self._connection.authenticated:
            self.refuse(f"no authentication within {AUTH_TIMEOUT_S:.0f}s")


class _ClientGate:
    """A client connection's sink while :func:`authenticate` waits for the challenge."""

    def __init__(self, protocol: FramedProtocol, handshake: ClientHandshake, what: str,
                 done: asyncio.Future[None]) -> None:
        self._protocol = protocol
        self._handshake = handshake
        self._what = what
        self._done = done

    def payload_buffer(self, header: FrameHeader) -> memoryview | None:
        limit = MAX_ERROR_MESSAGE_BYTES if header.status else MAX_AUTH_PAYLOAD
        if header.length > limit:
            raise ProtocolError(f"{header.length}-byte {header.op.name} frame during "
                                "authentication")
        return memoryview(bytearray(header.length))

    def frame_received(self, header: FrameHeader, payload: memoryview | None) -> None:
        body = bytes(payload or b"")
        try:
            self._answer(header, body)
        except KvcakeError as exc:
            if not self._done.done():
                self._done.set_exception(exc)
            if self._protocol.transport is not None:
                self._protocol.transport.abort()
            return
        self._protocol.receiver.sink = self._protocol
        if not self._done.done():
            self._done.set_result(None)

    def _answer(self, header: FrameHeader, body: bytes) -> None:
        if header.status:
            raise refusal(self._what, header.status, body.decode(errors="replace"))
        if header.op is not FrameOp.AUTH_CHALLENGE:
            raise AuthenticationError(f"{self._what} answered the hello with {header.op.name}")
        try:
            proof = self._handshake.proof(body)
        except AuthenticationError as exc:
            raise AuthenticationError(f"{self._what}: {exc.args[0]}") from None
        assert self._protocol.transport is not None
        self._protocol.transport.write(pack_header(FrameOp.AUTH_PROOF, 0, length=len(proof))
                                       + proof)


async def authenticate(protocol: FramedProtocol, auth: ClusterAuth, what: str,
                       timeout_s: float) -> None:
    """Prove to the server behind a freshly connected ``protocol`` that we hold the token,
    and check that it holds it too. Raises :class:`AuthenticationError` on a refusal or a
    mismatch, :class:`KvcakeError` (``RPC_FAIL``) on a silent or lost peer."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    handshake = ClientHandshake(auth)
    protocol.receiver.sink = _ClientGate(protocol, handshake, what, done)
    protocol.auth_waiter = done
    assert protocol.transport is not None
    hello = handshake.hello()
    protocol.transport.write(pack_header(FrameOp.AUTH_HELLO, 0, length=len(hello)) + hello)
    try:
        await asyncio.wait_for(asyncio.shield(done), timeout_s)
    except TimeoutError:
        protocol.transport.abort()
        raise KvcakeError(f"{what} did not answer the authentication within {timeout_s}s",
                          ErrorCode.RPC_FAIL) from None
    finally:
        protocol.auth_waiter = None


class FrameListener:
    """Lifecycle of a listening socket: ``await startup()`` → serve → ``await shutdown()``.

    ``auth``: the cluster credentials its connections require (default: the process's,
    :func:`kvcake.common.auth.cluster_auth`; an empty token requires none). ``poll_s``: how
    long to poll the connections after a read (:class:`ReadPoller`; 0: never).
    """

    def __init__(self, factory: Callable[[set[FramedServerConnection]], FramedServerConnection],
                 host: str, port: int, what: str, auth: ClusterAuth | None = None,
                 poll_s: float = 0.0) -> None:
        self._factory = factory
        self._host = host
        self._port = port
        self._what = what
        self.auth = auth if auth is not None else cluster_auth()
        self._server: asyncio.Server | None = None
        self._live: set[FramedServerConnection] = set()
        self.poller = ReadPoller(poll_s) if poll_s > 0 else None

    def _connection(self) -> FramedServerConnection:
        connection = self._factory(self._live)
        connection.auth = self.auth
        connection.poller = self.poller
        return connection

    async def startup(self) -> str:
        """Bind and listen; returns the ``host:port`` endpoint peers should dial."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._connection, self._host, self._port, reuse_address=True, backlog=512)
        return f"{self._host}:{self._server.sockets[0].getsockname()[1]}"

    async def shutdown(self, timeout: float = 5.0) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._live):
            connection.close()
        try:
            await asyncio.wait_for(self._server.wait_closed(), timeout)
        except TimeoutError:
            log.warning("%s connections still open after %.1fs", self._what, timeout)
        self._server = None
        if self.poller is not None:
            self.poller.close()
            self.poller = None
