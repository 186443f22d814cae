"""Request/reply over kvcake frames: CALL frames carry a codec-encoded request, CALL_REPLY
frames its reply (or, with a non-zero status, an error message). Many calls may be in
flight on one connection; replies are matched by request id.

With a cluster token (``auth``, default the process's) the server serves only connections
that authenticated, and the client authenticates each connection it opens
(:mod:`kvcake.common.auth`).

A server connection never dies of a bad request: a malformed frame ends that connection
only, a request the handler rejects is answered with its error code, and an unexpected
exception in a handler is logged and answered with ``INTERNAL_ERROR``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kvcake.common.auth import ClusterAuth, cluster_auth
from kvcake.common.codec import decode, encode
from kvcake.common.errors import ErrorCode, KvcakeError, ProtocolError, error_from_code
from kvcake.common.frames import FrameHeader, FrameOp, pack_header, receive_buffer
from kvcake.common.log import get_logger
from kvcake.common.stream import (
    FramedProtocol,
    FramedServerConnection,
    FrameListener,
    authenticate,
)

log = get_logger(__name__)

MAX_CALL_BYTES = 64 << 20
MAX_ERROR_BYTES = 1 << 16  # the longest error message a reply may carry
Handler = Callable[[memoryview], "bytes | Awaitable[bytes]"]


class _ServerConnection(FramedServerConnection):
    def __init__(self, handler: Handler, live: set[FramedServerConnection]) -> None:
        super().__init__(MAX_CALL_BYTES, live)
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()

    def payload_buffer(self, header: FrameHeader) -> memoryview | None:
        if header.op is not FrameOp.CALL:
            raise ProtocolError(f"an RPC server does not accept {header.op.name} frames")
        return receive_buffer(header.length)

    def frame_received(self, header: FrameHeader, payload: memoryview | None) -> None:
        if header.op is not FrameOp.CALL:
            raise ProtocolError(f"an RPC server does not accept {header.op.name} frames")
        try:
            reply = self._handler(payload if payload is not None else memoryview(b""))
        except Exception as exc:
            self._reply_error(header.request_id, exc)
            return
        if inspect.isawaitable(reply):
            task = asyncio.ensure_future(self._finish(header.request_id, reply))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._reply(header.request_id, reply)

    async def _finish(self, request_id: int, reply: Awaitable[bytes]) -> None:
        try:
            body = await reply
        except Exception as exc:
            self._reply_error(request_id, exc)
            return
        self._reply(request_id, body)

    def _reply(self, request_id: int, body: bytes) -> None:
        self.send(pack_header(FrameOp.CALL_REPLY, request_id, length=len(body)), body)

    def _reply_error(self, request_id: int, exc: Exception) -> None:
        if not isinstance(exc, KvcakeError):
            log.exception("RPC handler failed", exc_info=exc)
            exc = KvcakeError(f"internal error: {type(exc).__name__}: {exc}")
        self.reply_error(FrameOp.CALL_REPLY, request_id, exc)


class Dispatcher:
    """An RPC server's typed handler table: a call decodes as the channel's tagged union of
    messages and goes to the handler registered for its type; what the handler returns (a
    reply struct, or an awaitable of one) is encoded as the reply. Every member of the union
    has a handler, checked when the table is built.

    Hooks for what every call shares: ``admit(message)`` runs before its handler (and may
    refuse it by raising); ``settle(message)`` runs once the handler's reply is ready and may
    return an awaitable the reply then waits for (the master's durable writes)."""

    def __init__(self, union: Any, handlers: Mapping[type[Any], Callable[[Any], Any]],
                 admit: Callable[[Any], None] | None = None,
                 settle: Callable[[Any], Awaitable[None] | None] | None = None) -> None:
        missing = set(typing.get_args(union) or (union,)) - handlers.keys()
        if missing:
            raise TypeError(f"no handler for {sorted(m.__name__ for m in missing)}")
        self._union = union
        self.handlers = dict(handlers)  # message type -> handler
        self._admit = admit
        self._settle = settle or (lambda _: None)

    def decode(self, payload: memoryview) -> Any:
        """The message in ``payload`` (ProtocolError when it is none of the union's)."""
        return decode(payload, self._union)

    def handle(self, message: Any) -> Any:
        """The reply of ``message``'s handler, not yet encoded."""
        if self._admit is not None:
            self._admit(message)
        return self.handlers[type(message)](message)

    def __call__(self, payload: memoryview) -> bytes | Awaitable[bytes]:
        message = self.decode(payload)
        reply = self.handle(message)
        if inspect.isawaitable(reply):
            return self._encode_later(message, reply)
        settled = self._settle(message)
        return encode(reply) if settled is None else _encode_after(reply, settled)

    async def _encode_later(self, message: Any, reply: Awaitable[Any]) -> bytes:
        result = await reply
        settled = self._settle(message)
        if settled is not None:
            await settled
        return encode(result)


async def _encode_after(reply: Any, settled: Awaitable[None]) -> bytes:
    await settled
    return encode(reply)


class RpcServer(FrameListener):
    """``await startup()`` → serve ``handler`` → ``await shutdown()``."""

    def __init__(self, handler: Handler, host: str, port: int,
                 auth: ClusterAuth | None = None, poll_s: float = 0.0) -> None:
        super().__init__(lambda live: _ServerConnection(handler, live), host, port, "RPC",
                         auth, poll_s)


class _ClientConnection(FramedProtocol):
    def __init__(self, endpoint: str, on_lost: Callable[[_ClientConnection], None]) -> None:
        super().__init__(MAX_CALL_BYTES)
        self.endpoint = endpoint
        self._on_lost = on_lost
        self.pending: dict[int, asyncio.Future[bytes]] = {}

    def protocol_error(self, error: ProtocolError) -> None:
        self.fail_all(KvcakeError(f"{self.endpoint} broke the protocol: {error}",
                                  ErrorCode.RPC_FAIL))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        reason = str(exc) if exc else "closed by the server"
        self.fail_all(KvcakeError(f"connection to {self.endpoint} lost: {reason}",
                                  ErrorCode.RPC_FAIL))
        self._on_lost(self)

    def payload_buffer(self, header: FrameHeader) -> memoryview | None:
        if header.op is not FrameOp.CALL_REPLY:
            raise ProtocolError(f"unexpected {header.op.name} frame from an RPC server")
        if header.status and header.length > MAX_ERROR_BYTES:
            raise ProtocolError(f"error message of {header.length} bytes")
        return memoryview(bytearray(header.length))

    def frame_received(self, header: FrameHeader, payload: memoryview | None) -> None:
        body = bytes(payload) if payload is not None else b""
        if header.status:
            text = body.decode(errors="replace")
            error = error_from_code(header.status, f"{self.endpoint}: {text}")
            if header.request_id == 0:
                self.fail_all(error)
                return
            future = self.pending.pop(header.request_id, None)
            if future is not None and not future.done():
                future.set_exception(error)
            return
        future = self.pending.pop(header.request_id, None)
        if future is not None and not future.done():
            future.set_result(body)

    def fail_all(self, error: KvcakeError) -> None:
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)


class RpcClient:
    """One connection to an RPC server, opened on first use and again after a loss.

    Every failure to reach the server, and every call that outlives ``timeout_s``, raises
    :class:`KvcakeError` with ``RPC_FAIL``; errors the server answered keep their own code.
    A refused authentication raises :class:`AuthenticationError` (``UNAUTHENTICATED``).
    Must be used from one event loop.
    """

    def __init__(self, endpoint: str, timeout_s: float, auth: ClusterAuth | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.auth = auth if auth is not None else cluster_auth()
        self._connection: _ClientConnection | None = None
        self._connecting: asyncio.Lock | None = None
        self._ids = itertools.count(1)

    async def call(self, body: bytes) -> bytes:
        connection = await self._connect()
        request_id = next(self._ids)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        connection.pending[request_id] = future
        assert connection.transport is not None
        connection.transport.writelines(
            (pack_header(FrameOp.CALL, request_id, length=len(body)), body))
        try:  # not wait_for, which may swallow a cancellation that meets the reply
            async with asyncio.timeout(self.timeout_s):
                return await future
        except TimeoutError:
            connection.pending.pop(request_id, None)
            raise KvcakeError(f"no reply from {self.endpoint} within {self.timeout_s}s",
                              ErrorCode.RPC_FAIL) from None

    async def _connect(self) -> _ClientConnection:
        if self._connection is not None and self._connection.transport is not None:
            return self._connection
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._connection is None or self._connection.transport is None:
                self._connection = await self._open()
        return self._connection

    async def _open(self) -> _ClientConnection:
        host, _, port = self.endpoint.rpartition(":")
        loop = asyncio.get_running_loop()
        try:  # not wait_for: cancelled as it connects, it may drop the open transport
            async with asyncio.timeout(self.timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _ClientConnection(self.endpoint, self._forget), host, int(port))
        except (OSError, TimeoutError, ValueError) as exc:
            raise KvcakeError(f"cannot reach {self.endpoint}: {exc or type(exc).__name__}",
                              ErrorCode.RPC_FAIL) from None
        if self.auth.enabled:
            try:
                await authenticate(connection, self.auth, self.endpoint, self.timeout_s)
            except BaseException:
                if connection.transport is not None:
                    connection.transport.abort()
                raise
        return connection

    def _forget(self, connection: _ClientConnection) -> None:
        if self._connection is connection:
            self._connection = None

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.transport is not None:
            connection.transport.close()
