"""What ``kvcake bench serve`` measured: the stream of each request read into a result
(:class:`StreamTally`), one summary per system, the table, the ratios between set-ups and the
CDF plot. No network I/O: the replayer feeds lines in with their arrival times.

Definitions (the Mooncake paper's, where it has one):

* **TTFT**: from sending the request to the first streamed chunk that carries a choice.
* **gap**: time between two consecutive chunks with a choice (one chunk per token, whatever
  its text, even empty).
* **TBT of a request**: the mean of its slowest 10 % of gaps (at least one gap); a request
  with a single token has none and cannot break the TBT objective.
* **SLO attainment**: requests that completed with TTFT <= ``slo_ttft`` and TBT <=
  ``slo_tbt``, over all requests *sent* (rejected and failed ones count against it);
  ``admitted_slo_attainment`` over the requests not rejected, and ``reject_p99_s`` the time
  a rejected request waited for its 429 (admission control should answer at arrival).
* **goodput**: those requests per second of the run's wall time.
* **cached tokens ratio**: prompt tokens the server reported as cached
  (``usage.prompt_tokens_details.cached_tokens``) over prompt tokens, completed requests.
* **percentiles**: nearest rank (:func:`percentile`), so every reported value was observed.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from kvcake.bench.measure import print_rows
from kvcake.common.latency import percentile, slowest_gaps_mean

if TYPE_CHECKING:
    from matplotlib.axes import Axes

SUMMARY_KEYS = (
    "policy", "num_requests", "num_completed", "num_rejected", "num_errors", "ttft_mean_s",
    "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tbt_p50_s", "tbt_p90_s", "tbt_p99_s",
    "tbt_slow10_mean_s", "slo_attainment", "goodput_rps", "cached_tokens_ratio", "duration_s",
    "admitted_slo_attainment", "reject_p99_s",
)


class Outcome(StrEnum):
    COMPLETED = "completed"  # streamed to the end
    REJECTED = "rejected"  # HTTP 429: admission control said no
    ERROR = "error"  # anything else: HTTP error, error chunk, broken stream, timeout


@dataclass(frozen=True)
class RequestResult:
    """One replayed request. Times are seconds from the start of the run (``*_s``) or
    durations (``ttft_s``, ``gaps_s``); ``error`` holds the status and reason when not
    completed."""

    index: int
    row: int
    scheduled_s: float
    sent_s: float
    prompt_len: int
    max_tokens: int
    outcome: Outcome
    ttft_s: float | None = None
    gaps_s: tuple[float, ...] = ()
    completion_tokens: int = 0
    cached_tokens: int = 0
    finished_s: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class ReplayItem:
    """One request to send: its trace row, when (seconds after the run starts), what."""

    row: int
    scheduled_s: float
    prompt: tuple[int, ...]
    max_tokens: int
    text: str = ""  # the prompt as text, for servers that take no token ids


@dataclass(frozen=True)
class ReplayRun:
    """One system's replay: its results in trace order, the run's wall time, and the
    ``time.perf_counter()`` value that the results' times count from."""

    label: str
    results: tuple[RequestResult, ...]
    duration_s: float
    started_at: float = 0.0


class StreamTally:
    """What one streamed completion has said so far. Fed the response's lines with their
    arrival times (seconds from the run's start); :meth:`finish`, :meth:`refused` or
    :meth:`failed` turn it into a :class:`RequestResult`."""

    def __init__(self, index: int, item: ReplayItem, sent_s: float) -> None:
        self.index, self.item, self.sent_s = index, item, sent_s
        self.first_s: float | None = None
        self.last_s: float | None = None
        self.gaps: list[float] = []
        self.num_chunks = 0
        self.usage: dict[str, Any] = {}
        self.error: str | None = None

    def feed_line(self, line: bytes, now_s: float) -> bool:
        """One line of the event stream; True once the stream is over (``[DONE]``, an error
        payload or one that is not JSON)."""
        text = line.decode(errors="replace").strip()
        if not text.startswith("data:"):
            return False  # blank separators, comments, event names
        data = text.removeprefix("data:").strip()
        if data == "[DONE]":
            return True
        try:
            return self.feed(json.loads(data), now_s)
        except json.JSONDecodeError:
            self.error = f"not JSON in the stream: {data[:80]}"
            return True

    def feed(self, payload: Any, now_s: float) -> bool:
        """One decoded chunk; True if it ends the stream (an error)."""
        if not isinstance(payload, dict) or payload.get("error"):
            self.error = f"error in the stream: {error_reason(payload)}"
            return True
        if payload.get("choices"):
            if self.last_s is None:
                self.first_s = now_s
            else:
                self.gaps.append(now_s - self.last_s)
            self.last_s = now_s
            self.num_chunks += 1
        if isinstance(payload.get("usage"), dict):  # null on every chunk but the last
            self.usage = payload["usage"]
        return False

    def _result(self, outcome: Outcome, now_s: float, error: str | None) -> RequestResult:
        details = self.usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        reported = self.usage.get("completion_tokens")
        return RequestResult(
            self.index, self.item.row, self.item.scheduled_s, self.sent_s,
            len(self.item.prompt), self.item.max_tokens, outcome,
            None if self.first_s is None else self.first_s - self.sent_s, tuple(self.gaps),
            reported if isinstance(reported, int) else self.num_chunks,
            cached if isinstance(cached, int) else 0, now_s, error)

    def finish(self, now_s: float) -> RequestResult:
        """The stream ended: completed if it carried a token and no error."""
        if self.error is None and self.num_chunks == 0:
            self.error = "the stream ended without a token"
        return self._result(Outcome.ERROR if self.error else Outcome.COMPLETED, now_s,
                            self.error)

    def refused(self, status: int, body: str, now_s: float) -> RequestResult:
        """A non-200 answer: 429 is a rejection, anything else an error."""
        try:
            reason = error_reason(json.loads(body))
        except json.JSONDecodeError:
            reason = body.strip()[:200]
        outcome = Outcome.REJECTED if status == 429 else Outcome.ERROR
        return self._result(outcome, now_s, f"HTTP {status}: {reason}")

    def failed(self, message: str, now_s: float) -> RequestResult:
        return self._result(Outcome.ERROR, now_s, message)


def error_reason(body: Any) -> str:
    """The message of an OpenAI-style ``{"error": {"message", "code"|"type"}}`` body (or a
    ``{"detail": ...}`` one), with its code in front unless the message names it."""
    error = (body.get("error") or body.get("detail") or body) if isinstance(body, dict) else body
    if isinstance(error, dict):  # a named code says more than a number or a type
        code = error.get("code") if isinstance(error.get("code"), str) else error.get("type")
        message = str(error.get("message", error))[:200]
        return f"{code}: {message}" if code and str(code) not in message else message
    return str(error)[:200]


@dataclass(frozen=True)
class Slo:
    """Latency objectives, seconds: first token, and per-request TBT (slowest 10 % of gaps)."""

    ttft_s: float
    tbt_s: float


def meets_slo(result: RequestResult, slo: Slo) -> bool:
    if result.outcome is not Outcome.COMPLETED or result.ttft_s is None:
        return False
    tbt = slowest_gaps_mean(result.gaps_s)
    return result.ttft_s <= slo.ttft_s and (tbt is None or tbt <= slo.tbt_s)


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _count(results: Sequence[RequestResult], outcome: Outcome) -> int:
    return sum(1 for r in results if r.outcome is outcome)


def summarise(label: str, results: Sequence[RequestResult], duration_s: float,
              slo: Slo) -> dict[str, Any]:
    """One system's summary, keyed as :data:`SUMMARY_KEYS` (plus the SLOs used). Latency
    statistics cover completed requests; ``None`` where there is nothing to measure."""
    done = [r for r in results if r.outcome is Outcome.COMPLETED]
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    gaps = [gap for r in done for gap in r.gaps_s]
    tbts = [t for r in done if (t := slowest_gaps_mean(r.gaps_s)) is not None]
    good = sum(1 for r in results if meets_slo(r, slo))
    admitted = len(results) - _count(results, Outcome.REJECTED)
    waits = [r.finished_s - r.sent_s for r in results
             if r.outcome is Outcome.REJECTED and r.finished_s is not None]
    prompt_tokens = sum(r.prompt_len for r in done)
    return {
        "policy": label, "num_requests": len(results), "num_completed": len(done),
        "num_rejected": _count(results, Outcome.REJECTED),
        "num_errors": _count(results, Outcome.ERROR), "ttft_mean_s": _mean(ttfts),
        **{f"ttft_p{p}_s": percentile(ttfts, p) for p in (50, 90, 99)},
        **{f"tbt_p{p}_s": percentile(gaps, p) for p in (50, 90, 99)},
        "tbt_slow10_mean_s": _mean(tbts),
        "slo_attainment": good / len(results) if results else None,
        "goodput_rps": good / duration_s if duration_s > 0 else None,
        "cached_tokens_ratio": (sum(r.cached_tokens for r in done) / prompt_tokens
                                if prompt_tokens else None),
        "admitted_slo_attainment": good / admitted if admitted else None,
        "reject_p99_s": percentile(waits, 99),
        "duration_s": duration_s, "num_good": good, "slo_ttft_s": slo.ttft_s,
        "slo_tbt_s": slo.tbt_s,
    }


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


_COLUMNS = [("policy", "system"), ("num_requests", "sent"), ("num_completed", "done"),
            ("num_rejected", "429"), ("num_errors", "errors"), ("ttft_mean_s", "TTFT mean s"),
            ("ttft_p50_s", "TTFT p50"), ("ttft_p90_s", "p90"), ("ttft_p99_s", "p99"),
            ("tbt_p50_ms", "gap p50 ms"), ("tbt_p99_ms", "gap p99 ms"),
            ("tbt_slow10_ms", "TBT ms"), ("slo_pct", "SLO %"),
            ("admitted_slo_pct", "admitted SLO %"), ("reject_p99_ms", "429 p99 ms"),
            ("goodput_rps", "goodput/s"),
            ("cached_pct", "cached %"), ("duration_s", "run s")]


def print_table(summaries: Sequence[dict[str, Any]]) -> None:
    """The summaries as an aligned table: TTFT in seconds, gaps and TBT in milliseconds."""
    rows = [{**s, "tbt_p50_ms": _scaled(s["tbt_p50_s"], 1e3),
             "tbt_p99_ms": _scaled(s["tbt_p99_s"], 1e3),
             "tbt_slow10_ms": _scaled(s["tbt_slow10_mean_s"], 1e3),
             "slo_pct": _scaled(s["slo_attainment"], 100.0),
             "admitted_slo_pct": _scaled(s["admitted_slo_attainment"], 100.0),
             "reject_p99_ms": _scaled(s["reject_p99_s"], 1e3),
             "cached_pct": _scaled(s["cached_tokens_ratio"], 100.0)} for s in summaries]
    print_rows(rows, _COLUMNS, as_json=False)


RATIOS = (("ttft_mean_s", "round_robin", "kvcache_centric", "mean TTFT"),
          ("goodput_rps", "kvcache_centric", "colocated", "goodput"),
          # the vLLM set-ups: kvcake's Conductor over P/D against SGLang's router
          ("ttft_mean_s", "kvcache_centric", "router_cache_aware", "mean TTFT"),
          ("tbt_p90_s", "kvcache_centric", "router_cache_aware", "gap p90"),
          ("ttft_mean_s", "router_round_robin", "kvcache_centric", "mean TTFT"),
          ("goodput_rps", "kvcache_centric", "router_round_robin", "goodput"))


def comparison_ratios(summaries: Sequence[dict[str, Any]]) -> list[tuple[str, float | None]]:
    """The headline ratios between set-ups that were both run: ``(text, value)``; the value
    is ``None`` where the denominator is missing or zero."""
    by_label = {s["policy"]: s for s in summaries}
    ratios: list[tuple[str, float | None]] = []
    for key, top, bottom, what in RATIOS:
        if top in by_label and bottom in by_label:
            num, den = by_label[top][key], by_label[bottom][key]
            value = num / den if num is not None and den else None
            ratios.append((f"{what} {top} / {bottom}", value))
    return ratios


def print_ratios(summaries: Sequence[dict[str, Any]]) -> None:
    for text, value in comparison_ratios(summaries):
        print(f"{text}: {'n/a' if value is None else f'{value:.2f}'}")


def _cdf(values: Sequence[float], total: int) -> tuple[list[float], list[float]]:
    """Sorted values and, for each, the fraction of ``total`` requests at or below it."""
    ordered = sorted(values)
    return ordered, [(i + 1) / total for i in range(len(ordered))]


def plot_cdfs(path: str | Path, runs: Sequence[ReplayRun], slo: Slo) -> None:
    """Write a PNG: CDF of TTFT (left) and of per-request TBT (right), one curve per system,
    over all requests sent: a curve that stops below 1 lost the rest to rejections or errors
    (and, for TBT, to single-token replies, which have no gap). The SLOs are dashed lines.
    Raises ``OSError`` if ``path`` cannot be written."""
    from matplotlib.figure import Figure  # Agg through savefig; no pyplot, no display

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    ttft_ax, tbt_ax = figure.subplots(1, 2)
    for run in runs:
        done = [r for r in run.results if r.outcome is Outcome.COMPLETED]
        total = max(1, len(run.results))
        ttft_ax.step(*_cdf([r.ttft_s for r in done if r.ttft_s is not None], total),
                     where="post", label=run.label)
        tbts = [t * 1e3 for r in done if (t := slowest_gaps_mean(r.gaps_s)) is not None]
        tbt_ax.step(*_cdf(tbts, total), where="post", label=run.label)
    _decorate(ttft_ax, "TTFT (s)", slo.ttft_s)
    _decorate(tbt_ax, "TBT: mean of the slowest 10 % of gaps (ms)", slo.tbt_s * 1e3)
    figure.savefig(path, dpi=110)


def _decorate(axes: Axes, xlabel: str, slo: float) -> None:
    axes.axvline(slo, linestyle="--", color="grey", linewidth=1, label="SLO")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("fraction of requests sent")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")


def describe_window(items: Sequence[ReplayItem], speed: float, block_tokens: int,
                    slo: Slo, workload: str = "trace", reuse: float | None = None) -> str:
    """One line on what is replayed: rows, timing, sizes, the share of prompt blocks an
    earlier request of the window had (``reuse``), objectives."""
    prompt = statistics.fmean(len(i.prompt) for i in items)
    reply = statistics.fmean(i.max_tokens for i in items)
    rows = "conversation turns" if workload == "conversations" else "trace rows"
    shared = "" if reuse is None else f", {reuse:.0%} of its blocks reused"
    return (f"{rows} {items[0].row}..{items[-1].row}: {len(items)} requests over "
            f"{items[-1].scheduled_s:.1f} s at speed {speed:g}; mean prompt {prompt:.0f} "
            f"tokens (blocks of {block_tokens}{shared}), mean reply {reply:.1f} tokens; SLO "
            f"TTFT {slo.ttft_s:g} s, TBT {slo.tbt_s * 1e3:g} ms")


def print_failures(runs: Sequence[ReplayRun], out: TextIO) -> None:
    """Per system, how many requests did not complete and the first reason."""
    for run in runs:
        failed = [r for r in run.results if r.error is not None]
        if failed:
            print(f"[{run.label}] {len(failed)} of {len(run.results)} not completed; first: "
                  f"{failed[0].error}", file=out)


def report(runs: Sequence[ReplayRun], slo: Slo, as_json: bool,
           plot_path: str | None) -> list[dict[str, Any]]:
    """Summarise every run and print them: one JSON object per system, or the table and
    the ratios; failures go to stderr; the plot is written if ``plot_path``. Returns the
    summaries."""
    summaries = [summarise(run.label, run.results, run.duration_s, slo) for run in runs]
    print_failures(runs, sys.stderr)
    if as_json:
        for summary in summaries:
            print(json.dumps(summary), flush=True)
    else:
        print_table(summaries)
        print_ratios(summaries)
    if plot_path:
        plot_cdfs(plot_path, runs, slo)
        print(f"plot: {plot_path}", file=sys.stderr if as_json else sys.stdout)
    return summaries
