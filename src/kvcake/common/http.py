"""A minimal asyncio HTTP/1.1 responder for small admin endpoints (``/metrics``, ``/health``,
the store master's ``/query_key`` ...).

Enough for Prometheus scrapes, curl and pollers: GET and HEAD only, one response per
connection, bounded request size. A route gets the raw query string (``""`` when there is
none) and returns an :class:`HttpReply`; :func:`parse_query` decodes a query strictly.
A route's :class:`KvcakeError` becomes its status hint with the message; anything richer
belongs to the API front end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.parse
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import NamedTuple

from kvcake.common.errors import InvalidParamsError, KvcakeError
from kvcake.common.log import get_logger

log = get_logger(__name__)

TEXT = "text/plain; version=0.0.4; charset=utf-8"
JSON = "application/json; charset=utf-8"
MAX_QUERY_BYTES = 8 * 1024
_MAX_REQUEST_BYTES = 16 * 1024
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class HttpReply(NamedTuple):
    status: int
    content_type: str
    body: str


Route = Callable[[str], HttpReply]
Routes = Mapping[str, Route]


def text_reply(body: str, status: int = 200) -> HttpReply:
    return HttpReply(status, TEXT, body)


def json_reply(payload: object, status: int = 200) -> HttpReply:
    """Compact JSON, as Mooncake's admin endpoints write it."""
    return HttpReply(status, JSON, json.dumps(payload, separators=(",", ":")))


def parse_query(query: str) -> dict[str, str]:
    """Name → value of ``a=1&b=x%2Cy``, percent-decoded as UTF-8 (``+`` stays a plus, as
    in a path). :class:`InvalidParamsError` naming the fault for a query over
    :data:`MAX_QUERY_BYTES`, non-ASCII bytes, a malformed or non-UTF-8 escape, or a name
    given twice."""
    if len(query) > MAX_QUERY_BYTES:
        raise InvalidParamsError(f"query string of {len(query)} bytes is longer than the "
                                 f"{MAX_QUERY_BYTES} allowed")
    if not query.isascii():
        raise InvalidParamsError("query string holds raw non-ASCII bytes; percent-encode them")
    params: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        name, _, value = item.partition("=")
        name = _unquote(name)
        if name in params:
            raise InvalidParamsError(f"query parameter {name!r} is given twice")
        params[name] = _unquote(value)
    return params


def _unquote(text: str) -> str:
    bad = _BAD_ESCAPE.search(text)
    if bad is not None:
        raise InvalidParamsError(f"malformed percent-escape {text[bad.start():bad.start() + 3]!r}"
                                 " in the query string (want %XX, two hex digits)")
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError as exc:
        raise InvalidParamsError("percent-escapes in the query string are not UTF-8") from exc


class TextHttpServer:
    """Lifecycle: ``await startup()`` (the ``host:port`` it bound) → serve →
    ``await shutdown()``."""

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
        method = "GET"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            method, reply = self._respond(head)
        except asyncio.LimitOverrunError:
            reply = text_reply("request head is too long\n", 400)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            reply = text_reply("bad request\n", 400)
        payload = reply.body.encode()
        writer.write(f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}\r\n"
                     f"Content-Type: {reply.content_type}\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                     + (payload if method != "HEAD" else b""))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def _respond(self, head: bytes) -> tuple[str, HttpReply]:
        """The request's method, and the reply."""
        line = head.split(b"\r\n", 1)[0]
        parts = line.decode("latin-1").split(" ")
        method = parts[0] if parts[0] in ("GET", "HEAD") else "GET"
        if len(line) > _MAX_REQUEST_BYTES:
            return method, text_reply(f"request line of {len(line)} bytes is longer than the "
                                      f"{_MAX_REQUEST_BYTES} allowed\n", 400)
        if len(head) > _MAX_REQUEST_BYTES:
            return method, text_reply("request too large\n", 431)
        if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
            return method, text_reply("only GET is served here\n", 405)
        path, _, query = parts[1].partition("?")
        route = self._routes.get(path)
        if route is None:
            return method, text_reply(f"no such path; try {', '.join(sorted(self._routes))}\n",
                                      404)
        return method, _call(route, query)


def _call(route: Route, query: str) -> HttpReply:
    try:
        return route(query)
    except KvcakeError as exc:
        return text_reply(f"{exc}\n", exc.status)
    except Exception:  # a bug in a route must not cost the server; it is logged
        log.exception("an HTTP route failed")
        return text_reply("internal error\n", 500)
