"""A minimal asyncio HTTP/1.1 responder for plain-text endpoints (``/metrics``, ``/health``).

Enough for Prometheus scrapes and curl: GET only, one response per connection, bounded
request size. Anything richer belongs to the API front end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from kvcake.common.log import get_logger

log = get_logger(__name__)

Routes = dict[str, Callable[[], str]]
_MAX_REQUEST_BYTES = 16 * 1024
_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class TextHttpServer:
    def __init__(self, routes: Routes, host: str, port: int) -> None:
        self._routes = routes
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    async def startup(self) -> str:
        self._server = await asyncio.start_server(self._serve, self._host, self._port,
                                                  reuse_address=True)
        return f"{self._host}:{self._server.sockets[0].getsockname()[1]}"

    async def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            status, body = self._respond(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            status, body = "400 Bad Request", "bad request\n"
        payload = body.encode()
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {_CONTENT_TYPE}\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                     + payload)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def _respond(self, head: bytes) -> tuple[str, str]:
        if len(head) > _MAX_REQUEST_BYTES:
            return "431 Request Header Fields Too Large", "request too large\n"
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "only GET is served here\n"
        route = self._routes.get(parts[1].split("?", 1)[0])
        if route is None:
            return "404 Not Found", f"no such path; try {', '.join(sorted(self._routes))}\n"
        return "200 OK", route()
