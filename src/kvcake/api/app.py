"""The OpenAI-compatible HTTP front end over any :class:`Backend`.

One request through the app::

    CountResponses (by endpoint and status) -> AnswerUnhandled (-> logged 500)
      -> LimitBody (413 past max_body_bytes) -> RequireApiKey (when a key is set)
        -> route: validate (pydantic) -> model check -> n GenerateRequests (one per choice)
          -> first chunk of every choice          <- admission: 429/400/503 answered here
             stream:     200 + SSE, one event per chunk (tagged with its choice), "[DONE]"
             non-stream: the remaining chunks -> one JSON body

The first chunks are awaited before any header is sent, so a rejection is a real HTTP 429 even
for ``stream: true``. Every wait on the backend races the client's disconnect: when the client
leaves, the wait is cancelled and the backend's iterators closed, which aborts the requests
downstream. Each of ``n`` choices is a request of its own in the cluster (its own decode
seat); they share the prompt's KV through the prefix cache and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from kvcake.api.backend import Backend
from kvcake.api.errors import ApiError, ClientGoneError
from kvcake.api.metrics import ApiMetrics, CountResponses, RequestTimer
from kvcake.api.middleware import AnswerUnhandled, LimitBody, RequireApiKey
from kvcake.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from kvcake.api.responses import (
    ChatFormatter,
    CompletionFormatter,
    DetokenizeResponse,
    Formatter,
    ModelCard,
    ModelList,
    TokenizeResponse,
    Usage,
)
from kvcake.common.errors import InvalidParamsError, KvcakeError, RequestRejectedError
from kvcake.common.log import get_logger
from kvcake.wire.generate import GenerateChunk, GenerateRequest
from kvcake.wire.sampling import SEED_MAX, SamplingParams

log = get_logger(__name__)
T = TypeVar("T")
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLIENT_CLOSED = 499  # the status counted when the client left before an answer (as nginx does)
DEFAULT_MAX_BODY_BYTES = 4 << 20
_ROUTES = (  # method, path, _Routes method
    ("POST", "/v1/completions", "completions"), ("POST", "/v1/chat/completions", "chat"),
    ("GET", "/v1/models", "models"), ("GET", "/v1/models/{model_id:path}", "model"),
    ("POST", "/tokenize", "tokenize"), ("POST", "/detokenize", "detokenize"),
    ("GET", "/health", "health"), ("GET", "/metrics", "metrics"),
)


def build_app(backend: Backend, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The front end for ``backend``; with ``api_key`` every /v1/* route, /tokenize and
    /detokenize need that bearer key.

    /health and /metrics stay open so probes and scrapers need no secret. An empty
    ``api_key`` raises InvalidParamsError (None means no key). A request body longer than
    ``max_body_bytes`` is answered 413 before the rest of it is read.
    """
    if api_key is not None and not api_key:
        raise InvalidParamsError("api_key must not be empty; pass None to serve without a key")
    if max_body_bytes < 1:
        raise InvalidParamsError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    metrics = ApiMetrics()
    routes = _Routes(backend, metrics)
    app = FastAPI(title="kvcake", openapi_url=None, docs_url=None, redoc_url=None)
    for method, path, name in _ROUTES:
        app.add_api_route(path, getattr(routes, name), methods=[method], response_model=None)
    for error in (ApiError, KvcakeError, RequestValidationError, HTTPException):
        app.add_exception_handler(error, _answer_error)
    app.add_exception_handler(ClientGoneError, _answer_client_gone)
    if api_key is not None:
        app.add_middleware(RequireApiKey, api_key=api_key)
    app.add_middleware(LimitBody, max_bytes=max_body_bytes)
    app.add_middleware(AnswerUnhandled)
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
        request_id = f"cmpl-{uuid.uuid4().hex}"
        generates = [GenerateRequest(request_id=request_id, prompt=prompt, messages=None,
                                     params=body.params(), echo=bool(body.echo),
                                     add_special_tokens=body.add_special_tokens)
                     for prompt in body.prompts]
        formatter = CompletionFormatter(request_id, body.model, int(time.time()),
                                        body.include_usage, body.num_choices, bool(body.echo))
        return await self._answer(request, _choices(generates, body.num_choices), formatter,
                                  bool(body.stream))

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        generate = GenerateRequest(request_id=request_id, prompt=None,
                                   messages=body.message_dicts(), params=body.params(),
                                   add_generation_prompt=body.add_generation_prompt,
                                   add_special_tokens=body.add_special_tokens)
        formatter = ChatFormatter(request_id, body.model, int(time.time()), body.include_usage,
                                  body.num_choices)
        return await self._answer(request, _choices([generate], body.num_choices), formatter,
                                  bool(body.stream))

    async def tokenize(self, body: TokenizeRequest) -> Response:
        if body.model is not None:
            self._check_model(body.model)
        messages = None if body.messages is None else tuple(
            {"role": m.role, "content": m.content} for m in body.messages)
        tokens = await self._backend.tokenize(body.prompt, messages, body.special_tokens,
                                              body.add_generation_prompt)
        answer = TokenizeResponse(count=len(tokens), max_model_len=self._backend.max_model_len,
                                  tokens=tokens)
        return JSONResponse(answer.model_dump())

    async def detokenize(self, body: DetokenizeRequest) -> Response:
        if body.model is not None:
            self._check_model(body.model)
        text = await self._backend.detokenize(body.tokens)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

    async def models(self) -> Response:
        return JSONResponse(ModelList(data=[self._card()]).model_dump())

    async def model(self, model_id: str) -> Response:
        self._check_model(model_id)
        return JSONResponse(self._card().model_dump())

    def _card(self) -> ModelCard:
        return ModelCard(id=self._backend.model_name, created=self._started,
                         max_model_len=self._backend.max_model_len or None)

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

    async def _answer(self, request: Request, generates: list[GenerateRequest],
                      formatter: Formatter, stream: bool) -> Response:
        """Admit (every choice's first chunk), then stream events or collect one body."""
        generations = [_Generation(self._backend, g, self._metrics) for g in generates]
        streaming = False
        try:
            firsts = await _unless_disconnected(
                request.receive, _all([g.next() for g in generations]))
            if stream:
                streaming = True
                return _EventStream(generations, firsts, formatter)  # it closes them
            rests = await _unless_disconnected(request.receive, _all(
                [g.rest(first) for g, first in zip(generations, firsts, strict=True)]))
            return JSONResponse(formatter.response(
                [[first, *rest] for first, rest in zip(firsts, rests, strict=True)]))
        finally:
            if not streaming:
                for generation in generations:
                    await generation.close()


def _choices(generates: list[GenerateRequest], n: int) -> list[GenerateRequest]:
    """One request per choice, ``n`` per prompt: ``<id>`` alone, else ``<id>-<index>`` with
    index ``prompt * n + choice`` (the choice's index in the answer).

    A seeded request's choices draw from seeds ``seed, seed + 1, ...``: reproducible, yet not
    n copies of one answer.
    """
    if len(generates) == 1 and n == 1:
        return generates
    return [dataclasses.replace(generate, request_id=f"{generate.request_id}-{p * n + choice}",
                                params=_choice_params(generate.params, choice))
            for p, generate in enumerate(generates) for choice in range(n)]


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    if params.seed is None or not index:
        return params
    seed = params.seed + index if params.seed + index <= SEED_MAX else params.seed - index
    return dataclasses.replace(params, seed=seed)


async def _all(works: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Every result, in order; the first failure cancels the rest (awaited) and is raised."""
    tasks = [asyncio.ensure_future(work) for work in works]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


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

    Every chunk becomes an event even when its text is empty: clients time each token. With
    several choices their events interleave as their chunks arrive, each choice's in order.
    An error after the headers went out becomes an ``{"error": ...}`` event before ``[DONE]``.
    """

    media_type = "text/event-stream"

    def __init__(self, generations: list[_Generation], firsts: list[GenerateChunk],
                 formatter: Formatter) -> None:
        # no Response.__init__: that would set a Content-Length for an empty body
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache"})
        self._generations = generations
        self._firsts = firsts
        self._lasts = list(firsts)  # each choice's latest chunk: its usage is the final one
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
            for generation in self._generations:
                await generation.close()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                    "more_body": False})

    async def _send_chunks(self, send: Send) -> None:
        for event in self._formatter.opening(len(self._generations)):
            await _send_event(send, event)
        pending: dict[asyncio.Future[GenerateChunk], int] = {}
        try:
            for index, chunk in enumerate(self._firsts):
                await self._send_chunk(send, index, chunk, pending)
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    await self._send_chunk(send, pending.pop(task), task.result(), pending)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._formatter.include_usage:
            num_generated = sum(g.num_generated for g in self._generations)
            await _send_event(send, self._formatter.usage_chunk(
                Usage.of(self._lasts, self._formatter.choices_per_prompt, num_generated)))

    async def _send_chunk(self, send: Send, index: int, chunk: GenerateChunk,
                          pending: dict[asyncio.Future[GenerateChunk], int]) -> None:
        """Send one choice's chunk and, unless it was its last, ask for its next."""
        await _send_event(send, self._formatter.chunk(index, chunk))
        self._lasts[index] = chunk
        if chunk.finish_reason is None:
            pending[asyncio.ensure_future(self._generations[index].next())] = index


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
