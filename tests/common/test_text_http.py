"""TextHttpServer on an ephemeral port, spoken to with raw HTTP/1.1: routes get the raw
query, statuses and content types come back as the route says, and bad requests or a
failing route get a clear status instead of a dropped connection."""

from __future__ import annotations

import asyncio

import pytest

from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.http import JSON, HttpReply, Routes, TextHttpServer, json_reply, text_reply


def _fail(_: str) -> HttpReply:
    raise KvcakeError("no such thing", ErrorCode.OBJECT_NOT_FOUND)


def _crash(_: str) -> HttpReply:
    raise RuntimeError("a bug")


ROUTES: Routes = {
    "/echo": lambda query: text_reply(f"query={query}\n"),
    "/json": lambda _: json_reply({"ok": True}, 201),
    "/fail": _fail,
    "/crash": _crash,
}


async def _exchange(request: bytes) -> tuple[str, dict[str, str], bytes]:
    server = TextHttpServer(ROUTES, "127.0.0.1", 0)
    host, port = (await server.startup()).rsplit(":", 1)
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        await writer.drain()
        raw = await reader.read()
        writer.close()
    finally:
        await server.shutdown()
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status, headers, body


def get(target: str, method: str = "GET") -> tuple[str, dict[str, str], bytes]:
    return asyncio.run(_exchange(f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))


def test_a_route_gets_the_raw_query() -> None:
    status, headers, body = get("/echo?a=%20b&c")
    assert (status, body) == ("HTTP/1.1 200 OK", b"query=a=%20b&c\n")
    assert headers["Content-Length"] == str(len(body))


def test_status_and_content_type_come_from_the_route() -> None:
    status, headers, body = get("/json")
    assert (status, headers["Content-Type"], body) == ("HTTP/1.1 201 Created", JSON,
                                                       b'{"ok":true}')


def test_head_gets_the_headers_only() -> None:
    status, headers, body = get("/echo?x", "HEAD")
    assert (status, headers["Content-Length"], body) == ("HTTP/1.1 200 OK", "8", b"")


@pytest.mark.parametrize(("target", "method", "status", "words"), [
    ("/nope", "GET", "404 Not Found", b"try /crash, /echo, /fail, /json"),
    ("/echo", "POST", "405 Method Not Allowed", b"only GET"),
    ("/fail", "GET", "404 Not Found", b"OBJECT_NOT_FOUND: no such thing"),
    ("/crash", "GET", "500 Internal Server Error", b"internal error"),
    ("/echo?" + "x" * 20000, "GET", "400 Bad Request", b"request line of 20019 bytes"),
])
def test_bad_requests_and_failing_routes_get_a_clear_status(target: str, method: str,
                                                            status: str, words: bytes) -> None:
    got, _, body = get(target, method)
    assert got == f"HTTP/1.1 {status}" and words in body


def test_a_head_past_the_stream_limit_is_a_400() -> None:
    status, _, body = asyncio.run(_exchange(b"GET /echo?" + b"x" * 70000 + b" HTTP/1.1\r\n\r\n"))
    assert (status, body) == ("HTTP/1.1 400 Bad Request", b"request head is too long\n")
