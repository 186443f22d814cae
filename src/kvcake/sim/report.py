"""What a simulated run shows: one summary, as a table or JSON, and a CDF plot.

Definitions are the live benchmark's (``kvcake bench serve``) and the paper's:

* **TTFT**: arrival to first token (the end of the prefill step that completes the prompt).
* **TBT of a request**: the mean of its slowest 10 % of token gaps; the first gap runs from
  the first token to the second (KV transfer, waiting for a decode seat, one step).
* **SLO attainment**: requests with TTFT <= ``slo_ttft`` and TBT <= the TBT objective, over
  all requests (rejected ones count against it); given for TBT 100, 200 and 300 ms and for
  the run's own objective. The paper calls the share that meets the SLOs the *effective
  request capacity*; ``goodput_rps`` is that count per second of the replayed arrivals.
* **hit ratio**: prefix tokens (blocks) reused by prefills over all prompt tokens (blocks,
  the partial tail counted) of the requests that prefilled; *local* came from the prefill
  instance's own cache, *remote* was pulled from another instance or the pool tier.
* **prefill compute saved**: 1 - predicted prefill seconds with reuse / without.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from kvcake.common.latency import percentile
from kvcake.sim.profile import Profile
from kvcake.sim.request import Phase, SimRequest
from kvcake.sim.simulator import SimConfig

TBT_SLOS_S = (0.1, 0.2, 0.3)  # the paper's thresholds I, II, III


def meets_slo(request: SimRequest, slo_ttft_s: float, slo_tbt_s: float) -> bool:
    ttft = request.ttft_s
    if request.phase is not Phase.FINISHED or ttft is None or ttft > slo_ttft_s:
        return False
    return request.tbt_s is None or request.tbt_s <= slo_tbt_s


def summarise(config: SimConfig, requests: Sequence[SimRequest]) -> dict[str, Any]:
    """One JSON-ready summary of a run (see the module docstring)."""
    done = [r for r in requests if r.phase is Phase.FINISHED]
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    tbts = [r.tbt_s for r in done if r.tbt_s is not None]
    span_s = max(r.arrival_s for r in requests) - min(r.arrival_s for r in requests)
    attainment = {f"{slo:g}": _attainment(requests, config.slo_ttft_s, slo)
                  for slo in TBT_SLOS_S}
    met = _attainment(requests, config.slo_ttft_s, config.slo_tbt_s)
    return {
        "profile": config.profile.name, "policy": config.policy,
        "admission": config.admission, "num_prefill": config.num_prefill,
        "num_decode": config.num_decode, "num_colocated": config.num_colocated,
        "pool_capacity_blocks": config.pool_capacity_blocks,
        "num_requests": len(requests), "num_completed": len(done),
        "num_rejected": sum(r.phase is Phase.REJECTED for r in requests),
        "rejections": dict(sorted(Counter(str(r.rejected_reason) for r in requests
                                          if r.phase is Phase.REJECTED).items())),
        "ttft_mean_s": _mean(ttfts),
        **{f"ttft_p{p}_s": percentile(ttfts, p) for p in (50, 90, 99)},
        "tbt_mean_s": _mean(tbts),
        **{f"tbt_p{p}_s": percentile(tbts, p) for p in (50, 90, 99)},
        "slo_ttft_s": config.slo_ttft_s, "slo_tbt_s": config.slo_tbt_s,
        "slo_attainment": met, "slo_attainment_by_tbt": attainment,
        "arrival_rate_rps": len(requests) / span_s if span_s > 0 else None,
        "goodput_rps": met * len(requests) / span_s if span_s > 0 else None,
        **_hits(requests), "prefill_compute_saved": _compute_saved(config.profile, requests),
        "duration_s": max((r.finish_s or r.arrival_s) for r in requests),
    }


def _attainment(requests: Sequence[SimRequest], slo_ttft_s: float, slo_tbt_s: float) -> float:
    return sum(meets_slo(r, slo_ttft_s, slo_tbt_s) for r in requests) / len(requests)


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _prefilled(requests: Sequence[SimRequest]) -> list[SimRequest]:
    return [r for r in requests if r.first_token_s is not None]


def _hits(requests: Sequence[SimRequest]) -> dict[str, float]:
    prefilled = _prefilled(requests)
    blocks = sum(-(-r.num_prompt_tokens // r.block_tokens) for r in prefilled) or 1
    tokens = sum(r.num_prompt_tokens for r in prefilled) or 1
    local = sum(r.local_blocks for r in prefilled)
    remote = sum(r.pulled_blocks for r in prefilled)
    return {"hit_ratio_blocks": (local + remote) / blocks,
            "hit_ratio_tokens": sum(r.reused_tokens for r in prefilled) / tokens,
            "local_hit_ratio_blocks": local / blocks, "remote_hit_ratio_blocks": remote / blocks}


def _compute_saved(profile: Profile, requests: Sequence[SimRequest]) -> float:
    cost = profile.cost_model()
    prefilled = _prefilled(requests)
    full = sum(cost.prefill_s(r.num_prompt_tokens, 0) for r in prefilled)
    spent = sum(cost.prefill_s(r.num_to_compute, r.reused_tokens) for r in prefilled)
    return 1.0 - spent / full if full > 0 else 0.0


# ----- output
def print_json(summary: dict[str, Any], out: TextIO) -> None:
    print(json.dumps(summary, sort_keys=True), file=out)


def print_summary(summary: dict[str, Any], out: TextIO) -> None:
    s = summary
    layout = (f"{s['num_colocated']} colocated" if s["num_colocated"]
              else f"{s['num_prefill']} prefill + {s['num_decode']} decode")
    pool = ("no pool tier" if s["pool_capacity_blocks"] is None
            else f"pool {s['pool_capacity_blocks'] or 'unbounded'} blocks")
    print(f"{s['profile']}: {layout}, policy {s['policy']}, admission {s['admission']}, "
          f"{pool}", file=out)
    print(f"requests {s['num_requests']:,}: completed {s['num_completed']:,}, rejected "
          f"{s['num_rejected']:,} {s['rejections'] or ''}".rstrip(), file=out)
    print(_line("TTFT s", s, "ttft"), file=out)
    print(_line("TBT ms", s, "tbt", 1e3), file=out)
    slos = "  ".join(f"TBT {float(k) * 1e3:g} ms {v:6.1%}"
                     for k, v in s["slo_attainment_by_tbt"].items())
    print(f"SLO attainment (TTFT {s['slo_ttft_s']:g} s): {slos}", file=out)
    print(f"prefix hits: {s['hit_ratio_tokens']:.1%} of tokens, {s['hit_ratio_blocks']:.1%} "
          f"of blocks ({s['local_hit_ratio_blocks']:.1%} local, "
          f"{s['remote_hit_ratio_blocks']:.1%} remote); prefill compute saved "
          f"{s['prefill_compute_saved']:.1%}", file=out)
    rate = s["arrival_rate_rps"]
    if rate is not None:
        print(f"arrivals {rate:.3f} req/s; goodput {s['goodput_rps']:.3f} req/s; "
              f"simulated {s['duration_s']:,.0f} s", file=out)


def _line(label: str, s: dict[str, Any], key: str, scale: float = 1.0) -> str:
    names = ("mean", "p50", "p90", "p99")
    values = [s[f"{key}_{n}_s"] for n in names]
    text = "  ".join(f"{n} {'-' if v is None else f'{v * scale:,.3f}'}"
                     for n, v in zip(names, values, strict=True))
    return f"{label:>7}: {text}"


def plot_cdfs(path: str | Path, runs: Sequence[tuple[str, Sequence[SimRequest]]],
              slo_ttft_s: float, slo_tbt_s: float) -> None:
    """TTFT and TBT CDFs of finished requests, one line per labelled run."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (ttft_ax, tbt_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label, requests in runs:
        done = [r for r in requests if r.phase is Phase.FINISHED]
        for axes, values in ((ttft_ax, [r.ttft_s for r in done if r.ttft_s is not None]),
                             (tbt_ax, [r.tbt_s * 1e3 for r in done if r.tbt_s is not None])):
            ordered = sorted(values)
            axes.plot(ordered, [(i + 1) / len(requests) for i in range(len(ordered))],
                      label=label)
    for axes, xlabel, slo in ((ttft_ax, "TTFT (s)", slo_ttft_s),
                              (tbt_ax, "TBT: mean of slowest 10 % of gaps (ms)",
                               slo_tbt_s * 1e3)):
        axes.axvline(slo, color="grey", linestyle="--", linewidth=1)
        axes.set_xscale("log")
        axes.set_xlabel(xlabel)
        axes.set_ylabel("share of all requests")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
