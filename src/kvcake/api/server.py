"""Serving the front end with uvicorn inside the process's own event loop.

uvicorn usually owns the process: it makes the loop, installs SIGINT/SIGTERM handlers and
configures logging. Here the Conductor owns all three, so :class:`ApiServer` binds the socket
itself, runs ``uvicorn.Server.serve`` as a task of the running loop with signal capture
switched off, and leaves logging alone (uvicorn's loggers only get a level).

Shutdown order: stop accepting and close idle connections (uvicorn) -> wait up to the timeout
for requests in flight -> close the connections of those still running, which the app treats
as a client leaving (it closes the backend iterator, aborting the request downstream) -> wait
briefly for that cleanup, cancelling whatever still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from kvcake.common.errors import InvalidParamsError, KvcakeError

_CLEANUP_S = 2.0  # how long cancelled requests get to close their backend iterators
KEEP_ALIVE_S = 75  # idle HTTP connections: longer than aiohttp's (15 s) and httpx's (5 s) pools


class _EmbeddedServer(uvicorn.Server):
    """uvicorn's server minus signal handling, saying when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the owning process handles signals

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.listening.set()


class ApiServer:
    """Serves ``app`` on ``host:port`` from the running event loop: ``startup`` → ``shutdown``.

    ``log_level`` applies to uvicorn's own loggers (warnings by default); there is no access
    log. ``keep_alive_s``: an idle connection stays open this long (seconds), past common
    clients' idle pools, so that the client, never the server, closes an idle connection
    and no request is written into one the server is closing.
    """

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 8000,
                 log_level: str = "warning", keep_alive_s: int = KEEP_ALIVE_S) -> None:
        self._app = app
        self._keep_alive_s = keep_alive_s
        self._host = host
        self._port = port
        self._log_level = log_level
        self._server: _EmbeddedServer | None = None
        self._serving: asyncio.Task[None] | None = None
        self.address: str | None = None

    async def startup(self) -> str:
        """Bind and start serving; returns the ``host:port`` bound (port 0 picks a free one).

        Raises OSError when the address cannot be bound, InvalidParamsError when already
        started, KvcakeError when uvicorn stops before it listens.
        """
        if self._serving is not None:
            raise InvalidParamsError(f"the API server is already serving on {self.address}")
        sock = _bind(self._host, self._port)
        config = uvicorn.Config(self._app, log_config=None, log_level=self._log_level,
                                access_log=False, lifespan="off",
                                timeout_keep_alive=self._keep_alive_s)
        server = _EmbeddedServer(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="kvcake-api-server")
        listening = asyncio.ensure_future(server.listening.wait())
        await asyncio.wait((serving, listening), return_when=asyncio.FIRST_COMPLETED)
        if not listening.done():
            listening.cancel()
            sock.close()
            raise KvcakeError(f"the API server stopped before listening on {self._host}:"
                              f"{self._port}: {serving.exception()!r}")
        self._server, self._serving = server, serving
        self.address = _address(sock)
        return self.address

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, let requests in flight finish for ``timeout_s``, then cancel them.

        Returns once uvicorn has stopped; calling it again (or before startup) does nothing.
        """
        server, serving = self._server, self._serving
        if server is None or serving is None:
            return
        self._server = self._serving = None
        server.should_exit = True  # uvicorn closes its listener and idle connections
        _, running = await asyncio.wait((serving,), timeout=timeout_s)
        if running:
            server.force_exit = True  # uvicorn stops waiting for connections to drain
            await _abandon_requests(server)
        await serving


async def _abandon_requests(server: uvicorn.Server) -> None:
    """End the requests still in flight, as if their clients had left.

    Closing a connection is what the app already handles: it cancels the backend wait and
    closes its iterator. A request still running after ``_CLEANUP_S`` is cancelled outright.
    """
    for connection in list(server.server_state.connections):
        connection.transport.close()
    requests = list(server.server_state.tasks)
    if requests:
        _, stuck = await asyncio.wait(requests, timeout=_CLEANUP_S)
        for task in stuck:
            task.cancel()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
