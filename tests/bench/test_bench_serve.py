"""``kvcake bench serve`` without a model: statistics on hand-made results, the stream
reader on hand-made lines, and the replayer end to end against a fake OpenAI server."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kvcake.bench import serve, serve_launch
from kvcake.bench.serve import (
    ServeBenchOptions,
    add_serve_bench_parser,
    build_items,
    options_from_args,
    replay,
    run_serve_bench,
    setup_command,
)
from kvcake.bench.serve_launch import launched, stop_process
from kvcake.bench.serve_report import (
    SUMMARY_KEYS,
    Outcome,
    ReplayItem,
    ReplayRun,
    RequestResult,
    Slo,
    StreamTally,
    comparison_ratios,
    meets_slo,
    plot_cdfs,
    summarise,
)
from kvcake.bench.serve_vllm import closing_lines
from kvcake.common.aio import LoopThread
from kvcake.common.errors import InvalidParamsError, KvcakeError
from kvcake.common.latency import percentile, slowest_gaps_mean
from kvcake.common.sockets import free_port
from kvcake.common.trace import load_trace, synthesize_prompt

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REJECT_LEN, FAIL_LEN, HANG_LEN = 12, 14, 16  # prompt lengths the fake server treats specially


# ---- statistics -------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(10, 0, -1)]
    assert [percentile(values, p) for p in (0, 10, 50, 90, 99, 100)] == [1, 1, 5, 9, 10, 10]
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([3.0, 1.0, 2.0], 34) == 2.0  # 34 % of 3 is 1.02: the 2nd value
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(InvalidParamsError, match=re.escape("percentile must be 0..100")):
        percentile([1.0], 101)


def test_tbt_is_the_mean_of_the_slowest_tenth_of_gaps() -> None:
    assert slowest_gaps_mean([]) is None
    assert slowest_gaps_mean([0.3, 0.1]) == 0.3  # always at least one gap
    assert slowest_gaps_mean([0.1] * 18 + [0.4, 0.6]) == 0.5  # 2 of 20
    assert slowest_gaps_mean([0.1] * 9 + [0.5, 0.7]) == 0.6  # ceil(1.1) = 2 of 11
    assert slowest_gaps_mean([0.1] * 27 + [0.5, 0.5, 0.5]) == 0.5  # exactly 3 of 30


def _result(outcome: Outcome, ttft: float | None = None, gaps: tuple[float, ...] = (),
            cached: int = 0) -> RequestResult:
    return RequestResult(0, 0, 0.0, 0.0, 100, len(gaps) + 1, outcome, ttft, gaps,
                         len(gaps) + 1 if ttft is not None else 0, cached, 1.0)


SLO = Slo(ttft_s=5.0, tbt_s=0.3)
RESULTS = [
    _result(Outcome.COMPLETED, 1.0, (0.1,) * 9 + (0.5,), cached=50),  # TBT 0.5: too slow
    _result(Outcome.COMPLETED, 2.0, (0.1,) * 10),  # good
    _result(Outcome.COMPLETED, 6.0, (0.2, 0.2), cached=25),  # TTFT too slow
    _result(Outcome.COMPLETED, 0.5, (), cached=25),  # good: one token, no gap to judge
    _result(Outcome.REJECTED),
    _result(Outcome.ERROR),
]


def test_slo_needs_completion_ttft_and_tbt() -> None:
    assert [meets_slo(r, SLO) for r in RESULTS] == [False, True, False, True, False, False]


def test_summary_counts_percentiles_slo_goodput_and_cache() -> None:
    summary = summarise("kvcache_centric", RESULTS, duration_s=4.0, slo=SLO)
    assert set(SUMMARY_KEYS) <= summary.keys()
    assert {k: summary[k] for k in ("policy", "num_requests", "num_completed",
                                    "num_rejected", "num_errors", "num_good")} == {
        "policy": "kvcache_centric", "num_requests": 6, "num_completed": 4,
        "num_rejected": 1, "num_errors": 1, "num_good": 2}
    assert summary["ttft_mean_s"] == 2.375
    assert (summary["ttft_p50_s"], summary["ttft_p90_s"], summary["ttft_p99_s"]) == (1, 6, 6)
    # 22 gaps: nineteen of 0.1, two of 0.2, one of 0.5
    assert (summary["tbt_p50_s"], summary["tbt_p90_s"], summary["tbt_p99_s"]) == (
        0.1, 0.2, 0.5)
    assert summary["tbt_slow10_mean_s"] == pytest.approx((0.5 + 0.1 + 0.2) / 3)
    assert summary["slo_attainment"] == 2 / 6
    assert summary["goodput_rps"] == 0.5
    assert summary["cached_tokens_ratio"] == 100 / 400
    assert summary["duration_s"] == 4.0


def test_summary_of_nothing_completed_has_no_latencies() -> None:
    summary = summarise("x", [_result(Outcome.REJECTED)], duration_s=1.0, slo=SLO)
    assert summary["num_completed"] == 0 and summary["slo_attainment"] == 0.0
    assert summary["ttft_p50_s"] is None and summary["cached_tokens_ratio"] is None
    json.dumps(summary)  # still one JSON object


def test_ratios_compare_only_systems_that_ran() -> None:
    summaries = [{"policy": "kvcache_centric", "ttft_mean_s": 2.0, "goodput_rps": 3.0},
                 {"policy": "round_robin", "ttft_mean_s": 5.0, "goodput_rps": 1.0},
                 {"policy": "colocated", "ttft_mean_s": 9.0, "goodput_rps": 0.0}]
    assert comparison_ratios(summaries) == [
        ("mean TTFT round_robin / kvcache_centric", 2.5),
        ("goodput kvcache_centric / colocated", None)]  # zero goodput: no ratio
    assert comparison_ratios(summaries[:2]) == [("mean TTFT round_robin / kvcache_centric", 2.5)]
    vllm = [{"policy": "kvcache_centric", "ttft_mean_s": 2.0, "tbt_p90_s": 0.05,
             "goodput_rps": 0.5},
            {"policy": "router_cache_aware", "ttft_mean_s": 4.0, "tbt_p90_s": 0.2,
             "goodput_rps": 0.1}]
    assert comparison_ratios(vllm) == [("mean TTFT kvcache_centric / router_cache_aware", 0.5),
                                       ("gap p90 kvcache_centric / router_cache_aware", 0.25)]


def test_plot_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "cdf.png"
    plot_cdfs(path, [ReplayRun("a", tuple(RESULTS), 4.0), ReplayRun("b", (), 1.0)], SLO)
    assert path.read_bytes().startswith(PNG_SIGNATURE)


# ---- the stream reader ------------------------------------------------------------------


def _sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n"


ITEM = ReplayItem(row=7, scheduled_s=0.25, prompt=(20, 21, 22, 23), max_tokens=3)


def test_tally_times_every_chunk_with_a_choice_and_reads_usage() -> None:
    tally = StreamTally(2, ITEM, sent_s=0.5)
    lines = [(b": keep-alive\n", 0.6), (b"\n", 0.6),
             (_sse({"choices": [{"text": "a"}], "usage": None}), 1.0),
             (_sse({"choices": [{"text": ""}]}), 1.25),  # empty text is still a token
             (_sse({"choices": [{"text": "c", "finish_reason": "length"}]}), 1.75),
             (_sse({"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 4,
                                             "prompt_tokens_details": {"cached_tokens": 2}}}),
              1.8)]
    assert [tally.feed_line(line, now) for line, now in lines] == [False] * 6
    assert tally.feed_line(b"data: [DONE]\n", 1.9)
    assert tally.finish(2.0) == RequestResult(
        2, 7, 0.25, 0.5, 4, 3, Outcome.COMPLETED, 0.5, (0.25, 0.5), 3, 2, 2.0, None)


def test_tally_without_usage_counts_chunks_and_no_cache() -> None:
    tally = StreamTally(0, ITEM, sent_s=0.0)
    for now in (0.1, 0.2):
        tally.feed_line(_sse({"choices": [{"text": "x"}]}), now)
    result = tally.finish(0.3)
    assert (result.completion_tokens, result.cached_tokens) == (2, 0)


@pytest.mark.parametrize(("line", "error"), [
    (_sse({"error": {"message": "engine died", "code": "TRANSFER_FAIL"}}),
     "error in the stream: TRANSFER_FAIL: engine died"),
    (b"data: {oops\n", "not JSON in the stream: {oops"),
])
def test_tally_stops_at_an_error_chunk(line: bytes, error: str) -> None:
    tally = StreamTally(0, ITEM, sent_s=0.0)
    tally.feed_line(_sse({"choices": [{"text": "x"}]}), 0.1)
    assert tally.feed_line(line, 0.2)
    result = tally.finish(0.3)
    assert (result.outcome, result.error, result.ttft_s) == (Outcome.ERROR, error, 0.1)


def test_tally_of_a_stream_without_tokens_is_an_error() -> None:
    result = StreamTally(0, ITEM, sent_s=0.0).finish(1.0)
    assert (result.outcome, result.error) == (Outcome.ERROR, "the stream ended without a token")


def test_refusals_keep_status_and_reason() -> None:
    tally = StreamTally(0, ITEM, sent_s=0.0)
    body = json.dumps({"error": {"message": "TTFT would break the SLO", "type": "overloaded",
                                 "code": 429}})
    rejected = tally.refused(429, body, 0.1)
    assert (rejected.outcome, rejected.error) == (
        Outcome.REJECTED, "HTTP 429: overloaded: TTFT would break the SLO")
    kvcake_body = json.dumps({"error": {"message": "request rejected (tbt_slo): decode full",
                                        "type": "rate_limit_error", "code": "tbt_slo"}})
    assert tally.refused(429, kvcake_body, 0.1).error == (
        "HTTP 429: request rejected (tbt_slo): decode full")
    assert tally.refused(503, '{"detail": "not ready"}', 0.1).error == "HTTP 503: not ready"
    failed = tally.refused(502, "Bad Gateway\n", 0.1)
    assert (failed.outcome, failed.error) == (Outcome.ERROR, "HTTP 502: Bad Gateway")


# ---- the replayer against a fake server ---------------------------------------------------


class FakeOpenAI:
    """Streams ``max_tokens`` chunks, one per token, then usage (half the prompt cached);
    429 for prompts of REJECT_LEN tokens, 500 for FAIL_LEN, no answer for HANG_LEN."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, dict[str, Any]]] = []
        self.in_flight = self.max_in_flight = 0
        self.url = ""

    async def start(self) -> None:
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        self.release.set()
        await self.runner.cleanup()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.arrivals.append((time.perf_counter(), body))
        length = len(body["prompt"])
        if length == REJECT_LEN:
            return web.json_response({"error": {"message": "busy", "type": "overloaded",
                                                "code": 429}}, status=429)
        if length == FAIL_LEN:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if length == HANG_LEN:
            await self.release.wait()
            return web.Response()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._stream(request, length, body["max_tokens"])
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, length: int,
                      max_tokens: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(max_tokens):
            await asyncio.sleep(0.003)
            await response.write(_sse({"choices": [{"index": 0, "text": "" if i == 1 else "t"}],
                                       "usage": None}) + b"\n")
        usage = {"prompt_tokens": length, "completion_tokens": max_tokens,
                 "prompt_tokens_details": {"cached_tokens": length // 2}}
        await response.write(_sse({"choices": [], "usage": usage}) + b"\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
def fake_server() -> Iterator[FakeOpenAI]:
    thread = LoopThread("fake-openai")
    server = FakeOpenAI()
    thread.run(server.start())
    try:
        yield server
    finally:
        thread.run(server.stop())
        thread.stop()


def _trace(tmp_path: Path, *rows: tuple[int, int, int]) -> str:
    """(timestamp ms, prompt tokens, reply tokens) rows; prompts under one 512-token block."""
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps({"timestamp": t, "input_length": i, "output_length": o,
                                        "hash_ids": [1]}) + "\n" for t, i, o in rows))
    return str(path)


ROWS = ((0, 10, 3), (30, 11, 4), (60, REJECT_LEN, 2), (60, 13, 1), (120, FAIL_LEN, 2),
        (150, 15, 6))


def _options(url: str, trace: str, **fields: Any) -> ServeBenchOptions:
    return ServeBenchOptions(endpoint=url, trace=trace, input_scale=1.0, output_scale=1.0,
                             max_output_tokens=100, speed=0.5, **fields)


def test_replay_sends_in_trace_order_on_time_and_records_everything(
        fake_server: FakeOpenAI, tmp_path: Path) -> None:
    options = _options(fake_server.url, _trace(tmp_path, *ROWS))
    items = build_items(options)
    assert [i.scheduled_s for i in items] == [0.0, 0.06, 0.12, 0.12, 0.24, 0.3]  # speed 0.5
    run = asyncio.run(replay(fake_server.url, "fake", items, options))
    results = run.results
    assert [r.row for r in results] == list(range(6))
    assert [r.outcome for r in results] == [Outcome.COMPLETED, Outcome.COMPLETED,
                                           Outcome.REJECTED, Outcome.COMPLETED, Outcome.ERROR,
                                           Outcome.COMPLETED]
    assert results[2].error == "HTTP 429: overloaded: busy"
    assert results[4].error == "HTTP 500: boom"
    sent = [r.sent_s for r in results]
    assert sent == sorted(sent) and all(r.sent_s >= r.scheduled_s for r in results)
    arrivals = {len(body["prompt"]): at - run.started_at for at, body in fake_server.arrivals}
    assert all(arrivals[len(i.prompt)] >= i.scheduled_s for i in items)  # never early
    done = [r for r in results if r.outcome is Outcome.COMPLETED]
    assert [(r.completion_tokens, len(r.gaps_s), r.cached_tokens) for r in done] == [
        (3, 2, 5), (4, 3, 5), (1, 0, 6), (6, 5, 7)]
    assert all(r.ttft_s is not None and r.ttft_s > 0 for r in done)
    assert run.duration_s >= max(r.finished_s or 0.0 for r in results)


def test_requests_carry_the_synthesised_prompt_and_streaming_options(
        fake_server: FakeOpenAI, tmp_path: Path) -> None:
    options = _options(fake_server.url, _trace(tmp_path, (0, 10, 3)))
    asyncio.run(replay(fake_server.url, "fake", build_items(options), options))
    [(_, body)] = fake_server.arrivals
    prompt = synthesize_prompt(load_trace(options.trace)[0], 512, 49152, 17)
    assert body == {"model": "fake-model", "prompt": prompt, "max_tokens": 3, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def test_concurrency_limit_keeps_one_request_in_flight(fake_server: FakeOpenAI,
                                                       tmp_path: Path) -> None:
    options = _options(fake_server.url, _trace(tmp_path, *[(0, 10 + i % 2, 4) for i in range(5)]),
                       concurrency_limit=1, model="fake-model")
    run = asyncio.run(replay(fake_server.url, "fake", build_items(options), options))
    assert [r.outcome for r in run.results] == [Outcome.COMPLETED] * 5
    assert fake_server.max_in_flight == 1


def test_a_request_past_its_timeout_is_an_error(fake_server: FakeOpenAI,
                                                tmp_path: Path) -> None:
    options = _options(fake_server.url, _trace(tmp_path, (0, 10, 2), (0, HANG_LEN, 2)),
                       request_timeout_s=0.5)
    run = asyncio.run(replay(fake_server.url, "fake", build_items(options), options))
    assert [r.outcome for r in run.results] == [Outcome.COMPLETED, Outcome.ERROR]
    assert "Timeout" in (run.results[1].error or "")


def test_json_run_prints_one_summary_and_writes_the_plot(
        fake_server: FakeOpenAI, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "out.png"
    options = _options(fake_server.url + "/v1/", _trace(tmp_path, *ROWS), as_json=True,
                       plot=str(plot), slo_ttft_s=30.0, slo_tbt_s=1.0)
    assert run_serve_bench(options) == 0
    out, err = capsys.readouterr()
    [line] = out.splitlines()
    summary = json.loads(line)
    assert set(SUMMARY_KEYS) <= summary.keys()
    assert summary["policy"] == fake_server.url
    assert (summary["num_requests"], summary["num_completed"], summary["num_rejected"],
            summary["num_errors"]) == (6, 4, 1, 1)
    assert summary["slo_attainment"] == 4 / 6
    assert summary["cached_tokens_ratio"] == (5 + 5 + 6 + 7) / (10 + 11 + 13 + 15)
    assert "trace rows 0..5: 6 requests" in err and "2 of 6 not completed" in err
    assert plot.read_bytes().startswith(PNG_SIGNATURE)


def test_table_run_and_a_system_that_completed_nothing(
        fake_server: FakeOpenAI, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options = _options(fake_server.url, _trace(tmp_path, (0, REJECT_LEN, 2)))
    assert run_serve_bench(options) == 1
    out = capsys.readouterr().out
    assert "TTFT mean s" in out and fake_server.url in out


# ---- options, flags and set-ups ---------------------------------------------------------


@pytest.mark.parametrize(("fields", "named"), [
    ({}, "give --endpoint URL"),
    ({"endpoint": "localhost:8000"}, "--endpoint must be an http(s):// URL"),
    ({"endpoint": "http://h:1", "compare": True}, "give one or the other"),
    ({"policies": ("kvcache_centric", "fastest")}, "unknown set-up 'fastest'"),
    ({"policies": ("random", "random")}, "names a set-up twice"),
    ({"endpoint": "http://h:1", "speed": 0.0}, "--speed must be > 0"),
    ({"endpoint": "http://h:1", "slo_tbt_s": -1.0}, "--slo-tbt must be > 0"),
    ({"endpoint": "http://h:1", "num_requests": 0}, "--num-requests must be >= 1"),
    ({"endpoint": "http://h:1", "start_row": -1}, "--start-row must be >= 0"),
    ({"endpoint": "http://h:1", "first_token_id": 50000}, "first_token_id < vocab_size"),
])
def test_bad_options_are_named(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidParamsError, match=re.escape(named)):
        ServeBenchOptions(**fields)


def test_start_row_past_the_trace_is_named(tmp_path: Path) -> None:
    options = _options("http://127.0.0.1:1", _trace(tmp_path, (0, 10, 1)), start_row=1)
    with pytest.raises(InvalidParamsError, match="start row 1 is past the trace's 1 rows"):
        build_items(options)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_bench_parser(parser.add_subparsers(dest="bench_command"))
    return parser.parse_args(["serve", *argv])


def test_flags_map_onto_options_and_defaults_follow_quick() -> None:
    args = _parse("--compare", "--quick", "--policies", "kvcache_centric, colocated",
                  "--speed", "2", "--slo-tbt", "0.1", "--duration", "9")
    assert callable(args.run)
    options = options_from_args(args)
    assert options == ServeBenchOptions(compare=True, quick=True, speed=2.0, slo_tbt_s=0.1,
                                        duration_s=9.0,
                                        policies=("kvcache_centric", "colocated"))
    assert (options.window_requests, options.window_duration_s, options.plot_path) == (
        30, 9.0, "bench-serve.png")
    full = options_from_args(_parse("--endpoint", "http://h:1/v1", "--json"))
    assert (full.window_requests, full.window_duration_s, full.plot_path, full.setups) == (
        200, 120.0, None, ("kvcache_centric", "round_robin", "colocated"))


def test_several_admission_rules_run_every_setup_under_each() -> None:
    options = ServeBenchOptions(policies=("kvcache_centric", "colocated"),
                                admission="none, predictive")
    assert options.runs() == [
        ("kvcache_centric+none", "kvcache_centric", "none"),
        ("kvcache_centric+predictive", "kvcache_centric", "predictive"),
        ("colocated+none", "colocated", "none"), ("colocated+predictive", "colocated",
                                                 "predictive")]
    assert ServeBenchOptions(compare=True, admission="early").runs()[0] == (
        "kvcache_centric", "kvcache_centric", "early")
    command = setup_command("colocated", 9, options, Path("d"), "predictive")
    assert command[command.index("--admission") + 1] == "predictive"
    with pytest.raises(InvalidParamsError, match="--admission: unknown rule 'maybe'"):
        ServeBenchOptions(compare=True, admission="none,maybe")


def test_rejections_and_admitted_attainment_in_the_summary() -> None:
    slo = Slo(5.0, 0.2)
    results = [RequestResult(0, 0, 0.0, 0.0, 10, 4, Outcome.COMPLETED, 1.0, (0.05, 0.05), 3,
                             0, 2.0),
               RequestResult(1, 1, 0.0, 1.0, 10, 4, Outcome.REJECTED, finished_s=1.004,
                             error="HTTP 429: rejected"),
               RequestResult(2, 2, 0.0, 2.0, 10, 4, Outcome.COMPLETED, 9.0, (0.05,), 2, 0,
                             12.0)]
    summary = summarise("x", results, 10.0, slo)
    assert summary["slo_attainment"] == pytest.approx(1 / 3)
    assert summary["admitted_slo_attainment"] == pytest.approx(1 / 2)
    assert summary["reject_p99_s"] == pytest.approx(0.004)


def test_setup_commands() -> None:
    options = ServeBenchOptions(compare=True, slo_ttft_s=3.0, slo_tbt_s=0.1, model="smollm2")
    assert setup_command("colocated", 1234, options, Path("/tmp/logs")) == [
        sys.executable, "-m", "kvcake.cli", "up", "--port", "1234", "--prefill", "0",
        "--decode", "0", "--both", "2", "--policy", "round_robin", "--slo-ttft", "3.0",
        "--slo-tbt", "0.1", "--admission", "none", "--log-dir", "/tmp/logs", "--model",
        "smollm2"]
    assert setup_command("round_robin", 9, ServeBenchOptions(compare=True), Path("d"))[3:12] == [
        "up", "--port", "9", "--prefill", "2", "--decode", "1", "--policy", "round_robin"]


# Like ``kvcake up``, it installs its SIGINT handler itself before it says it is serving:
# Python installs its default one (KeyboardInterrupt) only when SIGINT is not ignored, and a
# test run started in the background (``make test &``, nohup, some CI runners) hands its
# children SIGINT ignored, so the launcher's SIGINT would be lost and SIGTERM end it (-15).
HEALTH_SERVER = textwrap.dedent("""
    import http.server, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health)
    print("kvcake up: serving", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)
""")


def test_launched_waits_for_health_and_stops_with_sigint(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", HEALTH_SERVER, str(port)]
    with launched(command, url, tmp_path, health_timeout_s=30.0) as process:
        with urllib.request.urlopen(f"{url}/health", timeout=5.0) as response:
            assert response.status == 200
        assert process.poll() is None
    assert process.returncode == 0  # it caught SIGINT and shut down by itself


# Runs the rest of its arguments with SIGINT ignored, as a shell starts a background job
# without job control; exec keeps that disposition.
IGNORING_SIGINT = ("import os, signal, sys\n"
                   "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                   "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n")


def test_launched_stops_with_sigint_a_child_that_inherited_it_ignored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_launch, "_STOP_WAIT_S", ((signal.SIGINT, 30.0),))  # no SIGTERM
    port = free_port()
    command = [sys.executable, "-c", IGNORING_SIGINT, "-c", HEALTH_SERVER, str(port)]
    with launched(command, f"http://127.0.0.1:{port}", tmp_path, 30.0) as process:
        assert process.poll() is None
    assert process.returncode == 0  # SIGINT still reached its handler, not SIGKILL


def test_a_setup_that_exits_fails_with_its_log_tails(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "prefill-0.log").write_text("loading\nno such policy 'x'\n")
    command = [sys.executable, "-c", "print('starting'); raise SystemExit(3)"]
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(KvcakeError) as caught, launched(command, url, tmp_path, 30.0):
        pytest.fail("an exited set-up must not be used")
    text = str(caught.value)
    assert "exited with code 3" in text and "starting" in text
    assert "logs/prefill-0.log" in text and "no such policy 'x'" in text


def test_a_setup_that_never_gets_healthy_times_out(tmp_path: Path) -> None:
    # a set-up that handles SIGINT, as ``kvcake up`` does, so that a test run that hands its
    # children SIGINT ignored (see HEALTH_SERVER) does not wait out the launcher's SIGTERM
    sleeper = "import signal, time; signal.signal(2, signal.default_int_handler); time.sleep(60)"
    command = [sys.executable, "-c", sleeper]
    url = f"http://127.0.0.1:{free_port()}"
    with (pytest.raises(KvcakeError, match=re.escape("did not answer 200 within 0.5 s")),
          launched(command, url, tmp_path, 0.5)):
        pytest.fail("an unhealthy set-up must not be used")


def test_stop_escalates_to_sigkill_for_a_child_that_ignores_signals(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_launch, "_STOP_WAIT_S", ((signal.SIGINT, 0.2), (signal.SIGTERM, 0.2)))
    script = ("import signal, sys, time\n"
              "for s in (signal.SIGINT, signal.SIGTERM): signal.signal(s, signal.SIG_IGN)\n"
              "print('ready', flush=True)\ntime.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stdout.readline() == b"ready\n"  # handlers are in place
    stop_process(process)
    process.stdout.close()
    assert process.returncode == -signal.SIGKILL


FAKE_UP = textwrap.dedent("""
    import json, sys
    from aiohttp import web

    async def health(request):
        return web.Response(text="ok")

    async def models(request):
        return web.json_response({"data": [{"id": "fake-" + sys.argv[2]}]})

    async def completions(request):
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(body["max_tokens"]):
            await response.write(b'data: {"choices": [{"text": "t"}]}\\n\\n')
        usage = {"completion_tokens": body["max_tokens"],
                 "prompt_tokens_details": {"cached_tokens": 1}}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\\n\\n"
                             "data: [DONE]\\n\\n".encode())
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    print("kvcake up: serving", flush=True)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
""")


def test_compare_starts_each_setup_in_turn_and_prints_ratios_and_the_plot(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    started: list[str] = []

    def fake_up(name: str, port: int, options: ServeBenchOptions, log_dir: Path,
                admission: str | None = None) -> list[str]:
        assert log_dir.is_dir() and admission == "none"
        started.append(name)
        return [sys.executable, "-c", FAKE_UP, str(port), name]

    monkeypatch.setattr(serve, "setup_command", fake_up)
    monkeypatch.chdir(tmp_path)
    options = ServeBenchOptions(compare=True, trace=_trace(tmp_path, (0, 10, 3), (20, 11, 2)),
                                input_scale=1.0, output_scale=1.0)
    assert run_serve_bench(options) == 0
    assert started == ["kvcache_centric", "round_robin", "colocated"]
    out = capsys.readouterr().out
    table = out.splitlines()[2:5]
    assert [line.split()[:3] for line in table] == [
        ["kvcache_centric", "2", "2"], ["round_robin", "2", "2"], ["colocated", "2", "2"]]
    assert "mean TTFT round_robin / kvcache_centric: " in out
    assert "goodput kvcache_centric / colocated: " in out
    assert (tmp_path / "bench-serve.png").read_bytes().startswith(PNG_SIGNATURE)


def test_closing_lines_are_read_from_the_setup_s_logs(tmp_path: Path) -> None:
    assert closing_lines(tmp_path / "missing") == []
    (tmp_path / "prefill-0.log").write_text("INFO start\nkvcake P/D: 2 requests' KV written "
                                            "into decode instances, 1.0 MiB\n")
    (tmp_path / "decode-1.log").write_text("kvcake P/D: 2 requests' KV received\nbye\n")
    (tmp_path / "conductor.log").write_text("kvcake conductor: OpenAI API on ...\n"
                                            "kvcake TTFT model: 3 prefills ended\n")
    assert closing_lines(tmp_path) == ["conductor: kvcake TTFT model: 3 prefills ended",
                                       "decode-1: kvcake P/D: 2 requests' KV received",
                                       "prefill-0: kvcake P/D: 2 requests' KV written into "
                                       "decode instances, 1.0 MiB"]
