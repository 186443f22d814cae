"""The app's ASGI middleware: API keys, request body bounds, and the last-resort 500."""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvcake.api.errors import ApiError
from kvcake.common.log import get_logger

log = get_logger(__name__)


GUARDED = ("/v1", "/tokenize", "/detokenize")  # the OpenAI API's routes and vLLM's extras


class RequireApiKey:
    """Answers 401 to requests for :data:`GUARDED` routes without ``Authorization: Bearer
    <key>`` (/tokenize runs the tokenizer over a body of up to the size limit)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self._app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        guarded = scope["type"] == "http" and any(
            path == route or path.startswith(f"{route}/") for route in GUARDED)
        if guarded and not self._authorized(scope):
            error = ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer "
                             "<key>'", code="invalid_api_key")
            response = error.response()
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self._app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self._expected)  # constant time: no timing oracle


class AnswerUnhandled:
    """Turns an exception that nothing else handled into a logged 500 in OpenAI's shape."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, receive, send_tracked)
        except Exception:
            log.exception("unhandled error answering %s %s", scope["method"], scope["path"])
            if started:
                raise  # the answer already began; the server drops the connection
            error = ApiError(500, "internal server error; the server log has details")
            await error.response()(scope, receive, send)


class LimitBody:
    """Answers 413 to a request whose body is longer than ``max_bytes``.

    A declared ``Content-Length`` is checked before anything is read; a chunked body is
    counted as it arrives and refused as soon as it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self._app = app
        self._max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self._max_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max_bytes:  # FastAPI passes HTTPException through
                    raise HTTPException(413, self._too_large().message)
            return message

        await self._app(scope, counted, send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than the server's limit of "
                        f"{self._max_bytes} bytes", code="request_too_large")
