"""The OpenAI-compatible HTTP front end over any :class:`Backend`.

One request through the app::

    CountResponses (by endpoint and status) -> _AnswerUnhandled (-> logged 500)
      -> _RequireApiKey (/v1/* only, when a key is set)
        -> route: validate (pydantic) -> model check -> GenerateRequest
          -> first chunk from the backend            <- admission: 429/400/503 answered here
             stream:     200 + SSE, one event per chunk, then "data: [DONE]"
             non-stream: the remaining chunks -> one JSON body

The first chunk is awaited before any header is sent, so a rejection is a real HTTP 429 even
for ``stream: true``. Every wait on the backend races the client's disconnect: when the client
leaves, the wait is cancelled and the backend's iterator closed, which aborts the request
downstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvcake.api.backend import Backend, GenerateChunk, GenerateRequest
from kvcake.api.errors import ApiError, ClientGoneError
from kvcake.api.metrics import ApiMetrics, CountResponses, RequestTimer
from kvcake.api.protocol import (
    ChatCompletionRequest,
    ChatFormatter,
    CompletionFormatter,
    CompletionRequest,
    Formatter,
    ModelCard,
    ModelList,
    Usage,
)
from kvcake.common.errors import InvalidParamsError, KvcakeError, RequestRejectedError
from kvcake.common.log import get_logger

log = get_logger(__name__)
T = TypeVar("T")
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLIENT_CLOSED = 499  # the status counted when the client left before an answer (as nginx does)
_ROUTES = (  # method, path, _Routes method
    ("POST", "/v1/completions", "completions"), ("POST", "/v1/chat/completions", "chat"),
    ("GET", "/v1/models", "models"), ("GET", "/v1/models/{model_id}", "model"),
    ("GET", "/health", "health"), ("GET", "/metrics", "metrics"),
)

def build_app(backend: Backend, api_key: str | None = None) -> FastAPI:
    """The front end for ``backend``; with ``api_key`` every /v1/* route needs that bearer key.

    /health and /metrics stay open so probes and scrapers need no secret. An empty
    ``api_key`` raises InvalidParamsError (None means no key).
    """
    if api_key is not None and not api_key:
        raise InvalidParamsError("api_key must not be empty; pass None to serve without a key")
    metrics = ApiMetrics()
    routes = _Routes(backend, metrics)
    app = FastAPI(title="kvcake", openapi_url=None, docs_url=None, redoc_url=None)
    for method, path, name in _ROUTES:
        app.add_api_route(path, getattr(routes, name), methods=[method], response_model=None)
    for error in (ApiError, KvcakeError, RequestValidationError, HTTPException):
        app.add_exception_handler(error, _answer_error)
    app.add_exception_handler(ClientGoneError, _answer_client_gone)
    if api_key is not None:
        app.add_middleware(_RequireApiKey, api_key=api_key)
    app.add_middleware(_AnswerUnhandled)
    static_paths = {path for _, path, _ in _ROUTES if "{" not in path}
    app.add_middleware(CountResponses, counter=metrics.requests, paths=static_paths)  # outermost
    return app


async def _answer_error(request: Request, exc: Exception) -> Response:
    return ApiError.of(exc).response()


async def _answer_client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_CLOSED)


class _Routes:
    """The endpoints: validate, hand the request to the backend, answer in OpenAI's shape."""

    def __init__(self, backend: Backend, metrics: ApiMetrics) -> None:
        self._backend = backend
        self._metrics = metrics
        self._started = int(time.time())

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        generate = GenerateRequest(request_id=f"cmpl-{uuid.uuid4().hex}", prompt=body.prompt,
                                   messages=None, params=body.sampling_params(body.max_new_tokens))
        formatter = CompletionFormatter(generate.request_id, body.model, int(time.time()),
                                        body.include_usage)
        return await self._answer(request, generate, formatter, bool(body.stream))

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        generate = GenerateRequest(request_id=f"chatcmpl-{uuid.uuid4().hex}", prompt=None,
                                   messages=body.message_dicts(),
                                   params=body.sampling_params(body.max_new_tokens),
                                   add_generation_prompt=body.add_generation_prompt)
        formatter = ChatFormatter(generate.request_id, body.model, int(time.time()),
                                  body.include_usage)
        return await self._answer(request, generate, formatter, bool(body.stream))

    async def models(self) -> Response:
        card = ModelCard(id=self._backend.model_name, created=self._started)
        return JSONResponse(ModelList(data=[card]).model_dump())

    async def model(self, model_id: str) -> Response:
        self._check_model(model_id)
        return JSONResponse(ModelCard(id=model_id, created=self._started).model_dump())

    async def health(self) -> Response:
        """200 with the backend's details when it is ready, else 503 (also if it fails)."""
        try:
            ready, details = self._backend.health()
        except Exception as exc:
            log.exception("health check failed")
            ready, details = False, {"error": f"{type(exc).__name__}: {exc}"}
        return JSONResponse({"ready": ready, "details": details}, status_code=200 if ready else 503)

    async def metrics(self) -> Response:
        extra = self._backend.render_metrics()
        if extra and not extra.endswith("\n"):
            extra += "\n"
        return PlainTextResponse(self._metrics.render() + extra, media_type=METRICS_CONTENT_TYPE)

    def _check_model(self, name: str) -> None:
        if name != self._backend.model_name:
            raise ApiError(404, f"the model `{name}` does not exist; this server serves "
                           f"`{self._backend.model_name}`", param="model", code="model_not_found")

    async def _answer(self, request: Request, generate: GenerateRequest, formatter: Formatter,
                      stream: bool) -> Response:
        """Admit (first chunk), then stream events or collect one body."""
        generation = _Generation(self._backend, generate, self._metrics)
        streaming = False
        try:
            first = await _unless_disconnected(request.receive, generation.next())
            if stream:
                streaming = True
                return _EventStream(generation, first, formatter)  # it closes the generation
            rest = await _unless_disconnected(request.receive, generation.rest(first))
            return JSONResponse(formatter.response([first, *rest]))
        finally:
            if not streaming:
                await generation.close()


class _Generation:
    """One backend generation: iterated once, its chunks timed, always closed at the end.

    Errors come out as KvcakeError (the backend's own) or ApiError (500 for anything else,
    logged here); rejections are counted by reason.
    """

    def __init__(self, backend: Backend, request: GenerateRequest, metrics: ApiMetrics) -> None:
        self._backend = backend
        self._request = request
        self._metrics = metrics
        self._timer: RequestTimer = metrics.start_request()
        self._chunks: AsyncIterator[GenerateChunk] | None = None
        self._closed = False
        self.num_generated = 0

    async def next(self) -> GenerateChunk:
        try:
            if self._chunks is None:
                self._chunks = self._backend.generate(self._request)
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            raise ApiError(500, "the backend ended the stream without a finish_reason") from None
        except KvcakeError as exc:
            if isinstance(exc, RequestRejectedError):
                self._metrics.rejections.inc(reason=exc.reason)
            raise
        except Exception as exc:
            log.error("request %s: the backend failed", self._request.request_id, exc_info=exc)
            raise ApiError.of(exc) from exc
        self.num_generated += len(chunk.token_ids)
        self._timer.on_chunk(chunk)
        return chunk

    async def rest(self, first: GenerateChunk) -> list[GenerateChunk]:
        """The chunks after ``first``, up to and including the one with a finish_reason."""
        chunks: list[GenerateChunk] = []
        last = first
        while last.finish_reason is None:
            last = await self.next()
            chunks.append(last)
        return chunks

    async def close(self) -> None:
        """Stop the backend's iterator if it is still going; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        self._timer.finish()
        close = getattr(self._chunks, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception:
                log.exception("request %s: closing the backend stream failed",
                              self._request.request_id)


class _EventStream(Response):
    """200 + server-sent events: the opening events, one event per chunk, usage, ``[DONE]``.

    Every chunk becomes an event even when its text is empty: clients time each token. An
    error after the headers went out becomes an ``{"error": ...}`` event before ``[DONE]``.
    """

    media_type = "text/event-stream"

    def __init__(self, generation: _Generation, first: GenerateChunk,
                 formatter: Formatter) -> None:
        # no Response.__init__: that would set a Content-Length for an empty body
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache"})
        self._generation = generation
        self._first = first
        self._formatter = formatter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with contextlib.suppress(ClientGoneError):
            await _unless_disconnected(receive, self._send_all(send))

    async def _send_all(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        try:
            await self._send_chunks(send)
        except (KvcakeError, ApiError) as exc:
            await _send_event(send, ApiError.of(exc).body().model_dump_json())
        finally:
            await self._generation.close()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                    "more_body": False})

    async def _send_chunks(self, send: Send) -> None:
        for event in self._formatter.opening():
            await _send_event(send, event)
        chunk = self._first
        await _send_event(send, self._formatter.chunk(chunk))
        while chunk.finish_reason is None:
            chunk = await self._generation.next()
            await _send_event(send, self._formatter.chunk(chunk))
        if self._formatter.include_usage:
            usage = Usage.of(chunk, self._generation.num_generated)
            await _send_event(send, self._formatter.usage_chunk(usage))


async def _send_event(send: Send, data: str) -> None:
    await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(),
                "more_body": True})


async def _unless_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result, unless the client disconnects first.

    Then ``work`` is cancelled and waited for (so its cleanup has run), and ClientGoneError
    is raised.
    """
    worker = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((worker, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not worker.done():
            worker.cancel()
            await asyncio.wait((worker,))
    if worker.cancelled():
        raise ClientGoneError
    return worker.result()


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has gone (the request body was already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _RequireApiKey:
    """Answers 401 to /v1/* requests without ``Authorization: Bearer <key>``."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self._app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        guarded = scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/"))
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


class _AnswerUnhandled:
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
