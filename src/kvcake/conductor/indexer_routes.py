"""Mooncake's indexer API (:mod:`kvcake.conductor.indexer`) on the Conductor's HTTP server:
JSON, or msgpack for a body sent as ``application/msgpack`` (the reply in kind). With an API
key these routes need it too: ``/register`` makes the Conductor connect where it is told."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from fastapi import FastAPI, Request, Response

from kvcake.common.errors import InvalidParamsError, KvcakeError
from kvcake.conductor.indexer import (
    HashQuery,
    MooncakeIndexer,
    Query,
    Registration,
    Unregistration,
    decode_body,
)

_MSGPACK = "application/msgpack"
Handler = Callable[[Request], Awaitable[Response]]


def _reply(body: dict[str, Any], msgpack: bool, status: int = 200) -> Response:
    if msgpack:
        return Response(msgspec.msgpack.encode(body), status, media_type=_MSGPACK)
    return Response(msgspec.json.encode(body), status, media_type="application/json")


def _wants_msgpack(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip() == _MSGPACK


def _authorized(request: Request, api_key: str | None) -> bool:
    if api_key is None:
        return True
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), api_key.encode())


def _route(kind: type[Any] | None, answer: Callable[[Any], Any],
           api_key: str | None) -> Handler:
    async def handle(request: Request) -> Response:
        msgpack = _wants_msgpack(request)
        if not _authorized(request, api_key):
            return _reply({"error": "a valid API key is required"}, msgpack, 401)
        try:
            message = decode_body(await request.body(), kind, msgpack) if kind else None
            result = answer(message)
            if isinstance(result, Awaitable):
                result = await result
        except InvalidParamsError as exc:
            return _reply({"error": str(exc.args[0])}, msgpack, 400)
        except KeyError as exc:
            return _reply({"error": str(exc.args[0])}, msgpack, 404)
        except KvcakeError as exc:
            return _reply({"error": str(exc.args[0])}, msgpack, exc.status)
        return _reply(result, msgpack)

    return handle


def add_indexer_routes(app: FastAPI, indexer: MooncakeIndexer, api_key: str | None) -> None:
    for path, method, kind, answer in (
            ("/query", "POST", Query, indexer.query),
            ("/query_by_hash", "POST", HashQuery, indexer.query_by_hash),
            ("/register", "POST", Registration, indexer.register),
            ("/unregister", "POST", Unregistration, indexer.unregister),
            ("/services", "GET", None, lambda _: indexer.services())):
        app.add_api_route(path, _route(kind, answer, api_key), methods=[method],
                          response_model=None)
