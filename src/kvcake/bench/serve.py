"""``kvcake bench serve``: replay a Mooncake trace against OpenAI-compatible endpoints.

A window of the trace (``--start-row``, at most ``--num-requests`` rows and ``--duration``
seconds of replay time) is scaled (``--input-scale`` shrinks every 512-token block alike, so
prefix sharing survives), given made-up prompts (token ids derived from the hash ids), and
sent on the trace's own clock, compressed by ``--speed``, as streamed ``/v1/completions``.
Each request records TTFT, every gap between tokens and the cached prompt tokens the server
reports; ``serve_report`` turns them into one summary per system.

``--compare`` (or ``--policies``) starts each cluster set-up with ``kvcake up`` on a free
port, replays the *same* window against it and stops it, one after another::

    kvcache_centric   2 prefill + 1 decode, the Conductor routes on cached prefix and load
    round_robin       2 prefill + 1 decode, routing ignores the cache
    colocated         2 instances that both prefill and decode (the vLLM-style baseline)

Routing only matters with at least two prefill instances, hence 2 + 1 for every policy.
``--engine vllm`` compares vLLM-CPU set-ups instead (:mod:`kvcake.bench.serve_vllm`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kvcake.bench.serve_launch import launched, log_tail
from kvcake.bench.serve_report import (
    ReplayItem,
    ReplayRun,
    RequestResult,
    Slo,
    StreamTally,
    describe_window,
    report,
)
from kvcake.bench.serve_vllm import (
    DEFAULT_VLLM_SETUPS,
    VLLM_SETUPS,
    closing_lines,
    router_missing,
    vllm_setup,
)
from kvcake.common.aio import new_event_loop
from kvcake.common.config import require
from kvcake.common.conversations import ConversationSpec, conversation_records
from kvcake.common.errors import KvcakeError
from kvcake.common.sockets import free_port
from kvcake.common.trace import (
    TraceRecord,
    load_trace,
    most_reused_start,
    prefix_reuse,
    scale_record,
    scaled_block_tokens,
    synthesize_prompt,
    trace_window,
)
from kvcake.conductor.admission import ADMISSIONS
from kvcake.ops import kvcake_command

if TYPE_CHECKING:
    import aiohttp  # the `bench` extra: imported when a replay runs, so `kvcake` needs it not

T = TypeVar("T")
_ROUTED = ("--prefill", "2", "--decode", "1", "--policy")
SETUPS: dict[str, tuple[str, ...]] = {
    **{policy: (*_ROUTED, policy) for policy in
       ("kvcache_centric", "round_robin", "least_loaded", "cache_aware", "random")},
    "colocated": ("--prefill", "0", "--decode", "0", "--both", "2", "--policy", "round_robin"),
}
DEFAULT_SETUPS = ("kvcache_centric", "round_robin", "colocated")
WORKLOADS = ("conversations", "trace", "trace-reuse")
INPUT_SCALE, VLLM_INPUT_SCALE = 0.03, 0.125
DEFAULT_PLOT = "bench-serve.png"


@dataclass(frozen=True)
class ServeBenchOptions:
    """One ``kvcake bench serve`` run; fields match the flags (``*_s`` in seconds).

    endpoint: base URL of a running server (``http://HOST:PORT`` or ``.../v1``); excludes
        ``compare`` / ``policies``, which start ``kvcake up`` set-ups instead.
    workload: ``conversations`` (multi-turn sessions sized to the window, see
        ``common.conversations``), ``trace`` (rows of the trace from ``start_row``) or
        ``trace-reuse`` (the window of the trace whose prompts reuse the most); ``None``:
        ``trace`` when a ``trace`` file is given, else ``conversations``.
    num_requests / duration_s: the window, rows and seconds of replay time (``None``: 200 and
        120 s, or 30 and 20 s with ``quick``).
    speed: trace time compression (2.0 sends twice as fast as the trace did; the
        conversations workload is sized to ``duration_s`` of replay whatever the speed).
    input_scale / output_scale / max_output_tokens: see ``common.trace.scale_record``
        (``input_scale`` ``None``: 0.03, or 0.125 with ``engine="vllm"``: two trace
        blocks fill one 128-token vLLM block, and 2 CPUs keep up with the quick window).
    vocab_size / first_token_id: prompt token ids lie in ``[first_token_id, vocab_size)``
        (SmolLM2: 49,152 ids, those below 17 are special).
    request_timeout_s: longest any one request may take (``None``: 60 s, 30 s with quick).
    health_timeout_s: longest a set-up may take to answer ``/health`` with 200.
    engine: ``kvcake`` (kvcake's own engine) or ``vllm`` (vLLM-CPU set-ups).
    vllm_python: the vLLM venv's interpreter, with ``engine="vllm"``.
    """

    endpoint: str | None = None
    compare: bool = False
    quick: bool = False
    as_json: bool = False
    num_requests: int | None = None
    duration_s: float | None = None
    speed: float = 0.5
    start_row: int = 0
    workload: str | None = None
    input_scale: float | None = None
    output_scale: float = 0.1
    max_output_tokens: int = 64
    slo_ttft_s: float = 5.0
    slo_tbt_s: float = 0.2
    admission: str = "none"
    no_store: bool = False
    plot: str | None = None
    trace: str | None = None
    model: str | None = None
    api_key: str | None = None
    policies: tuple[str, ...] = ()
    concurrency_limit: int | None = None
    vocab_size: int = 49152
    first_token_id: int = 17
    request_timeout_s: float | None = None
    health_timeout_s: float = 300.0
    engine: str = "kvcake"
    vllm_python: str = ""

    def __post_init__(self) -> None:
        self._check_target()
        for name in ("speed", "input_scale", "output_scale", "slo_ttft_s", "slo_tbt_s",
                     "duration_s", "request_timeout_s", "health_timeout_s"):
            value = getattr(self, name)
            require(value is None or value > 0, f"{_flag(name)} must be > 0, got {value}")
        for name in ("num_requests", "max_output_tokens", "concurrency_limit", "start_row"):
            value, least = getattr(self, name), 0 if name == "start_row" else 1
            require(value is None or value >= least,
                    f"{_flag(name)} must be >= {least}, got {value}")
        require(0 <= self.first_token_id < self.vocab_size, "need 0 <= first_token_id < "
                f"vocab_size, got {self.first_token_id} and {self.vocab_size}")

    def _check_target(self) -> None:
        require(self.workload in (None, *WORKLOADS), f"--workload must be one of "
                f"{', '.join(WORKLOADS)}, got {self.workload!r}")
        require(not (self.trace and self.workload == "conversations"), "--trace replays a "
                "file's rows: --workload conversations makes up its own requests")
        require(self.engine in ("kvcake", "vllm"), f"--engine must be kvcake or vllm, got "
                f"{self.engine!r}")
        known = VLLM_SETUPS if self.engine == "vllm" else tuple(SETUPS)
        unknown = [p for p in self.policies if p not in known]
        require(not unknown, f"--policies: unknown set-up {(unknown or [''])[0]!r}; choose "
                f"from {', '.join(known)}")
        require(len(set(self.policies)) == len(self.policies), "--policies names a set-up "
                "twice")
        bad = [a for a in self.admissions if a not in ADMISSIONS]
        require(bool(self.admissions) and not bad, f"--admission: unknown rule "
                f"{(bad or [self.admission])[0]!r}; choose from {', '.join(ADMISSIONS)}")
        if self.launches:
            require(self.endpoint is None, "--endpoint replays against a running server and "
                    "--compare/--policies start their own: give one or the other")
            return
        require(self.endpoint is not None, "give --endpoint URL of a running server, or "
                "--compare to start the set-ups with kvcake up")
        require(str(self.endpoint).startswith(("http://", "https://")),
                f"--endpoint must be an http(s):// URL, got {self.endpoint!r}")

    @property
    def launches(self) -> bool:
        return self.compare or bool(self.policies)

    @property
    def setups(self) -> tuple[str, ...]:
        if self.policies:
            return self.policies
        if self.engine != "vllm":
            return DEFAULT_SETUPS
        missing = router_missing()
        return tuple(s for s in DEFAULT_VLLM_SETUPS
                     if not (missing and s.startswith("router_")))

    @property
    def admissions(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.admission.split(",") if a.strip())

    def runs(self) -> list[tuple[str, str, str]]:
        """(label, set-up, admission) of every ``kvcake up`` run, in order; the label names
        the admission rule only when several are compared."""
        several = len(self.admissions) > 1
        return [(f"{setup}+{admission}" if several else setup, setup, admission)
                for setup in self.setups for admission in self.admissions]

    @property
    def window_requests(self) -> int:
        return self.num_requests or (30 if self.quick else 200)

    @property
    def window_duration_s(self) -> float:
        return self.duration_s or (20.0 if self.quick else 120.0)

    @property
    def workload_name(self) -> str:
        return self.workload or ("trace" if self.trace else "conversations")

    @property
    def prompt_scale(self) -> float:
        if self.input_scale is not None:
            return self.input_scale
        return VLLM_INPUT_SCALE if self.engine == "vllm" else INPUT_SCALE

    @property
    def timeout_s(self) -> float:
        return self.request_timeout_s or (30.0 if self.quick else 60.0)

    @property
    def slo(self) -> Slo:
        return Slo(self.slo_ttft_s, self.slo_tbt_s)

    @property
    def plot_path(self) -> str | None:
        return self.plot or (DEFAULT_PLOT if self.launches else None)


def _flag(field: str) -> str:
    return "--" + field.removesuffix("_s").replace("_", "-")


def base_url(endpoint: str) -> str:
    """``http://h:p``, ``http://h:p/`` and ``http://h:p/v1`` all name server ``http://h:p``."""
    return endpoint.rstrip("/").removesuffix("/v1")


def workload_window(options: ServeBenchOptions) -> list[tuple[int, TraceRecord]]:
    """The ``(row, record)`` pairs to replay: the chosen workload cut to the window."""
    if options.workload_name == "conversations":
        records = conversation_records(_conversations(options))
        start = 0
    else:
        reuse = options.workload_name == "trace-reuse"
        limit = None if reuse else options.start_row + options.window_requests
        records = load_trace(options.trace, limit=limit)
        start = most_reused_start(records, options.window_requests, options.window_duration_s,
                                  options.speed) if reuse else options.start_row
    return trace_window(records, start, options.window_requests, options.window_duration_s,
                        options.speed)


def _conversations(options: ServeBenchOptions) -> ConversationSpec:
    """Sessions of 5 turns, enough of them to fill the window's rows, all arriving within
    its seconds: sessions open in the first quarter, turns follow on average every eighth."""
    turns = 5
    span_s = options.window_duration_s * options.speed  # the window in trace seconds
    return ConversationSpec(sessions=max(1, options.window_requests // turns), turns=turns,
                            open_s=span_s / 4, think_s=span_s / 8)


def build_items(options: ServeBenchOptions,
                window: Sequence[tuple[int, TraceRecord]] | None = None) -> list[ReplayItem]:
    """The window (``None``: :func:`workload_window`'s) as requests: scaled, with prompts,
    due in seconds after the first."""
    window = workload_window(options) if window is None else window
    block = scaled_block_tokens(options.prompt_scale)
    first = window[0][1].timestamp_ms
    decode = _text_of(options) if options.engine == "vllm" else None
    items = []
    for row, record in window:
        scaled = scale_record(record, options.prompt_scale, options.output_scale,
                              options.max_output_tokens)
        prompt = synthesize_prompt(scaled, block, options.vocab_size, options.first_token_id)
        due = (record.timestamp_ms - first) / 1000 / options.speed
        items.append(ReplayItem(row, due, tuple(prompt), scaled.output_length,
                                decode(prompt) if decode else ""))
    return items


def _text_of(options: ServeBenchOptions) -> Callable[[list[int]], str]:
    """Prompts as text: SGLang's router takes no token ids. Prompts that share token
    prefixes share text prefixes, so the reuse survives the servers' tokenizing."""
    from kvcake.model import resolve_model
    from kvcake.text import Tokenizer

    tokenizer = Tokenizer.from_dir(resolve_model(options.model or "smollm2").path)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


class _Replayer:
    """The HTTP side of one run: each request sent when due (and when a slot is free under
    ``limit``), its stream read line by line into a :class:`StreamTally`."""

    def __init__(self, session: aiohttp.ClientSession, url: str, model: str,
                 limit: int | None) -> None:
        import aiohttp

        self.failures = (aiohttp.ClientError, TimeoutError, ValueError)
        self.session, self.url, self.model = session, url, model
        self.slots = asyncio.Semaphore(limit) if limit else None
        self.start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.start

    async def run(self, items: Sequence[ReplayItem]) -> list[RequestResult]:
        tasks = []
        for index, item in enumerate(items):
            while (delay := item.scheduled_s - self.now()) > 0:
                await asyncio.sleep(delay)  # again if the timer fired a hair early
            tasks.append(asyncio.create_task(self._send_in_slot(index, item)))
        return list(await asyncio.gather(*tasks))

    async def _send_in_slot(self, index: int, item: ReplayItem) -> RequestResult:
        if self.slots is None:
            return await self._send(index, item)
        async with self.slots:
            return await self._send(index, item)

    async def _send(self, index: int, item: ReplayItem) -> RequestResult:
        tally = StreamTally(index, item, self.now())
        body = {"model": self.model, "prompt": item.text or list(item.prompt),
                "max_tokens": item.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        try:
            async with self.session.post(f"{self.url}/v1/completions", json=body) as response:
                if response.status != 200:
                    return tally.refused(response.status, await response.text(), self.now())
                async for line in response.content:
                    if tally.feed_line(line, self.now()):
                        break
        except self.failures as exc:
            reason = ": ".join(part for part in (type(exc).__name__, str(exc)) if part)
            return tally.failed(reason, self.now())
        return tally.finish(self.now())


async def fetch_model(session: aiohttp.ClientSession, url: str) -> str:
    """The first model ``url/v1/models`` lists. ``KvcakeError`` if none or unreachable."""
    import aiohttp

    try:
        async with session.get(f"{url}/v1/models") as response:
            listing = await response.json(content_type=None) if response.status == 200 else {}
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise KvcakeError(f"cannot list the models at {url}/v1/models: {exc}") from None
    models = listing.get("data") if isinstance(listing, dict) else None
    if not models or not isinstance(models[0], dict) or "id" not in models[0]:
        raise KvcakeError(f"{url}/v1/models lists no model; give --model")
    return str(models[0]["id"])


async def replay(url: str, label: str, items: Sequence[ReplayItem],
                 options: ServeBenchOptions) -> ReplayRun:
    """Send ``items`` to the server at base ``url`` when due; one result each, in order. The
    model is ``options.model``, else the server's first (always the server's for set-ups
    started here: there ``--model`` names what ``kvcake up`` loads)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    async with aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=options.timeout_s),
            connector=aiohttp.TCPConnector(limit=0)) as session:  # _Replayer limits, if asked
        model = options.model if not options.launches else None
        if options.launches and options.engine == "vllm":  # a router may list no model
            model = options.model or "smollm2"
        replayer = _Replayer(session, url, model or await fetch_model(session, url),
                             options.concurrency_limit)
        results = await replayer.run(items)
        return ReplayRun(label, tuple(results), replayer.now(), replayer.start)


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh loop. Ctrl-C raises ``KeyboardInterrupt`` out of it (an
    ``asyncio.Runner`` would cancel the replay instead, which counts its requests as
    failed and goes on with the next set-up)."""
    loop = new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def setup_command(name: str, port: int, options: ServeBenchOptions, log_dir: Path,
                  admission: str | None = None) -> list[str]:
    """The ``kvcake up`` command line of set-up ``name`` on ``port``."""
    model = ("--model", options.model) if options.model else ()
    return kvcake_command("up", "--port", str(port), *SETUPS[name], "--slo-ttft",
                          str(options.slo_ttft_s), "--slo-tbt", str(options.slo_tbt_s),
                          "--admission", admission or options.admissions[0],
                          "--log-dir", str(log_dir), *model,
                          *(("--no-store",) if options.no_store else ()))


def _run_setup(label: str, name: str, admission: str, items: Sequence[ReplayItem],
               options: ServeBenchOptions, work: Path) -> ReplayRun:
    (work / "logs").mkdir(parents=True)
    if options.engine == "vllm":
        return _run_vllm_setup(label, name, items, options, work)
    port, started = free_port(), time.monotonic()
    url = f"http://127.0.0.1:{port}"
    print(f"[{label}] kvcake up on port {port}", file=sys.stderr, flush=True)
    command = setup_command(name, port, options, work / "logs", admission)
    with launched(command, url, work, options.health_timeout_s) as process:
        print(f"[{label}] healthy after {time.monotonic() - started:.0f} s; replaying "
              f"{len(items)} requests", file=sys.stderr, flush=True)
        run = _run_async(replay(url, label, items, options))
        if process.poll() is not None:
            print(f"[{label}] kvcake up exited during the replay\n{log_tail(work)}",
                  file=sys.stderr)
    _print_closing_lines(label, work)
    return run


def _run_vllm_setup(label: str, name: str, items: Sequence[ReplayItem],
                    options: ServeBenchOptions, work: Path) -> ReplayRun:
    started = time.monotonic()
    print(f"[{label}] starting (vLLM)", file=sys.stderr, flush=True)
    slo = ("--slo-ttft", str(options.slo_ttft_s), "--slo-tbt", str(options.slo_tbt_s))
    with vllm_setup(name, work, options.health_timeout_s, slo, options.vllm_python) as url:
        print(f"[{label}] healthy after {time.monotonic() - started:.0f} s; replaying "
              f"{len(items)} requests", file=sys.stderr, flush=True)
        run = _run_async(replay(url, label, items, options))
    _print_closing_lines(label, work)
    return run


def _print_closing_lines(label: str, work: Path) -> None:
    for line in closing_lines(work / "logs"):  # written as the set-up stopped
        print(f"[{label}] {line}", file=sys.stderr, flush=True)


def _run_all(items: Sequence[ReplayItem], options: ServeBenchOptions) -> list[ReplayRun]:
    if not options.launches:
        assert options.endpoint is not None
        url = base_url(options.endpoint)
        return [_run_async(replay(url, url, items, options))]
    with tempfile.TemporaryDirectory(prefix="kvcake-bench-serve-") as temp:
        return [_run_setup(label, name, admission, items, options, Path(temp) / label)
                for label, name, admission in options.runs()]


def run_serve_bench(options: ServeBenchOptions) -> int:
    """Replay the window against the endpoint, or against each set-up in turn; print one
    summary per system (table and ratios, or JSON), write the plot if asked. Returns 1 if
    some system completed no request, else 0. Raises ``KvcakeError`` (``InvalidParamsError``,
    ``TraceError``) on bad input, or when a set-up does not start."""
    window = workload_window(options)
    items = build_items(options, window)
    block = scaled_block_tokens(options.prompt_scale)
    print(describe_window(items, options.speed, block, options.slo, options.workload_name,
                          prefix_reuse(record for _, record in window)), flush=True,
          file=sys.stderr if options.as_json else sys.stdout)
    summaries = report(_run_all(items, options), options.slo, options.as_json,
                       options.plot_path)
    return 1 if any(s["num_completed"] == 0 for s in summaries) else 0


# ("--flag METAVAR", option field, type, help); a flag left out keeps the option's default
_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--endpoint URL", "endpoint", str, "base URL of a running server, e.g. http://127.0.0.1:8000"),
    ("--num-requests N", "num_requests", int, "rows to replay (default 200; 30 with --quick)"),
    ("--duration S", "duration_s", float, "cap on replay seconds (default 120; 20 with --quick)"),
    ("--speed X", "speed", float, "trace time compression (default 0.5: half speed; the "
     "conversations workload fits its sessions into --duration whatever the speed)"),
    ("--workload NAME", "workload", str, "conversations (multi-turn sessions with shared "
     "system prompts; the default without --trace), trace (rows from --start-row; the "
     "default with --trace) or trace-reuse (the trace's window that reuses the most)"),
    ("--start-row K", "start_row", int, "first trace row, with --workload trace (default 0)"),
    ("--input-scale F", "input_scale", float, "prompt length factor (default 0.03; 0.125 with "
     "--engine vllm)"),
    ("--output-scale F", "output_scale", float, "reply length factor (default 0.1)"),
    ("--max-output-tokens N", "max_output_tokens", int, "reply length cap (default 64)"),
    ("--slo-ttft S", "slo_ttft_s", float, "TTFT objective in seconds (default 5)"),
    ("--slo-tbt S", "slo_tbt_s", float, "TBT objective in seconds (default 0.2)"),
    ("--admission A,B", "admission", str, "with --compare/--policies: none (default), ttft, "
     "early or predictive, passed to kvcake up; several run every set-up under each"),
    ("--plot PATH", "plot", str, f"CDF plot, PNG (default {DEFAULT_PLOT} with --compare)"),
    ("--trace PATH", "trace", str, "trace JSONL file (default: the packaged conversation trace)"),
    ("--model NAME", "model", str, "model name (default: the server's first); with --compare, "
     "passed to kvcake up"),
    ("--api-key KEY", "api_key", str, "sent as a bearer token"),
    ("--concurrency-limit N", "concurrency_limit", int, "most requests in flight (default: "
     "no limit)"),
    ("--engine NAME", "engine", str, "with --compare/--policies: kvcake (default) or vllm "
     f"(set-ups {', '.join(VLLM_SETUPS)})"),
    ("--vllm-python PATH", "vllm_python", str, "the vLLM venv's python, with --engine vllm"),
)


def options_from_args(args: argparse.Namespace) -> ServeBenchOptions:
    given = {field: getattr(args, field) for _, field, _, _ in _FLAGS
             if getattr(args, field) is not None}
    policies = tuple(p.strip() for p in (args.policies or "").split(",") if p.strip())
    return ServeBenchOptions(compare=args.compare, quick=args.quick, as_json=args.json,
                             no_store=args.no_store, policies=policies, **given)


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    return run_serve_bench(options_from_args(args))


def add_serve_bench_parser(
        bench_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` to ``kvcake bench``; like the other bench commands it sets ``run``."""
    serve = bench_commands.add_parser("serve", help="replay a Mooncake trace against an "
                                      "OpenAI endpoint, or compare kvcake up set-ups")
    serve.add_argument("--compare", action="store_true", help="start kvcache_centric, "
                       "round_robin and colocated with kvcake up, one after another")
    serve.add_argument("--policies", metavar="A,B",
                       help=f"set-ups to start instead, from {', '.join(SETUPS)}")
    serve.add_argument("--quick", action="store_true", help="30 requests, 20 s per system")
    serve.add_argument("--json", action="store_true", help="one JSON summary per system")
    serve.add_argument("--no-store", action="store_true", help="start set-ups without the KV "
                       "store (reuse then needs routing to the instance that holds a prefix)")
    for spec, field, kind, text in _FLAGS:
        flag, metavar = spec.split()
        serve.add_argument(flag, dest=field, metavar=metavar, type=kind, help=text)
    serve.set_defaults(run=_cmd_bench_serve)
