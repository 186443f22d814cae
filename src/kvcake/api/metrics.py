"""The front end's Prometheus series, and the per-request timer that feeds them.

Latencies are what a client sees, measured from the moment a validated request reaches the
front end::

    arrival ──TTFT──▶ first token chunk ──TBT──▶ next ──TBT──▶ ... last chunk (finish_reason)
    └───────────────────────────── E2E ──────────────────────────────┘

TTFT and TBT count only chunks that carry tokens (a chunk may carry only a finish reason).
E2E is observed only for requests that finished; a client that left early adds no E2E sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvcake.common.metrics import Counter, MetricsRegistry
from kvcake.wire.generate import GenerateChunk

# seconds; the paper's objectives are TTFT 30 s and TBT 100-300 ms, so both sit mid-range
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
TBT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ApiMetrics:
    """Every series the front end exports; ``clock`` (seconds, monotonic) is injectable."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.registry = registry = MetricsRegistry()
        self.requests = registry.counter("kvcake_api_requests_total",
                                         "HTTP responses by endpoint and status",
                                         ("endpoint", "status"))
        self.rejections = registry.counter("kvcake_api_rejections_total",
                                           "Requests turned away by admission control",
                                           ("reason",))
        self.ttft = registry.histogram("kvcake_api_ttft_seconds", "Time to first token",
                                       TTFT_BUCKETS)
        self.tbt = registry.histogram("kvcake_api_tbt_seconds",
                                      "Time between consecutive token chunks", TBT_BUCKETS)
        self.e2e = registry.histogram("kvcake_api_e2e_seconds",
                                      "Time from arrival to the last chunk", E2E_BUCKETS)
        self.prompt_tokens = registry.counter("kvcake_api_prompt_tokens_total",
                                              "Prompt tokens of admitted requests")
        self.generation_tokens = registry.counter("kvcake_api_generation_tokens_total",
                                                  "Tokens generated")
        self.cached_prompt_tokens = registry.counter("kvcake_api_cached_prompt_tokens_total",
                                                     "Prompt tokens whose KV was reused")
        self.running = registry.gauge("kvcake_api_running_requests",
                                      "Requests admitted and not yet finished or abandoned")

    def start_request(self) -> RequestTimer:
        """A timer for a request arriving now; it counts as running until ``finish``."""
        self.running.inc()
        return RequestTimer(self, self.clock())

    def render(self) -> str:
        return self.registry.render()


class RequestTimer:
    """Turns one request's chunks into latency samples and token counts."""

    def __init__(self, metrics: ApiMetrics, arrival: float) -> None:
        self._metrics = metrics
        self._arrival = arrival
        self._last_token_at: float | None = None
        self._seen_prompt = False
        self._done = False

    def on_chunk(self, chunk: GenerateChunk) -> None:
        """Record ``chunk``, which arrived now."""
        now = self._metrics.clock()
        if not self._seen_prompt:
            self._seen_prompt = True
            self._metrics.prompt_tokens.inc(chunk.num_prompt_tokens)
        if chunk.token_ids:
            self._on_tokens(len(chunk.token_ids), now)
        if chunk.finish_reason is not None:  # the reused count is final with the last chunk
            self._metrics.cached_prompt_tokens.inc(chunk.num_cached_tokens)
            self._metrics.e2e.observe(now - self._arrival)

    def _on_tokens(self, num_tokens: int, now: float) -> None:
        if self._last_token_at is None:
            self._metrics.ttft.observe(now - self._arrival)
        else:
            self._metrics.tbt.observe(now - self._last_token_at)
        self._last_token_at = now
        self._metrics.generation_tokens.inc(num_tokens)

    def finish(self) -> None:
        """The request is over (finished, failed or abandoned); later calls do nothing."""
        if not self._done:
            self._done = True
            self._metrics.running.dec()


class CountResponses:
    """ASGI middleware: counts every HTTP answer by endpoint and status in ``counter``.

    The endpoint is the matched route's template (``/v1/models/{model_id}``), else the path
    when it is one of ``paths`` (answered before routing, e.g. 401), else ``other``, so that
    random paths cannot grow the label set. An exception that escapes counts as 500.
    """

    def __init__(self, app: ASGIApp, counter: Counter, paths: Collection[str]) -> None:
        self._app = app
        self._counter = counter
        self._paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_counted)
        finally:
            self._counter.inc(endpoint=self._endpoint(scope), status=str(status))

    def _endpoint(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None:  # the template without its converters (``{id:path}``)
            return str(getattr(route, "path_format", route.path))
        path = scope.get("path", "")
        return path if path in self._paths else "other"
