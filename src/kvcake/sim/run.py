"""``kvcake sim`` runners: one simulated cluster, a capacity sweep, the global pool alone, a
profile fitted from ``kvcake bench engine``. Output goes to ``out``; nothing here parses flags.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from kvcake.common.conversations import ConversationSpec, conversation_records
from kvcake.common.errors import InvalidParamsError
from kvcake.common.trace import TraceRecord, load_trace
from kvcake.sim.cache import CacheReplay, replay_pool
from kvcake.sim.profile import fit_profile, load_profile
from kvcake.sim.report import plot_cdfs, print_json, print_summary, summarise
from kvcake.sim.simulator import SimConfig, Simulator
from kvcake.sim.sweep import Capacity, Probe, find_capacity, layout_label, plot_capacities
from kvcake.sim.workload import WorkloadSpec, build_requests

WORKLOADS = ("trace", "conversations")


def workload_records(trace: str | None, workload: str = "trace",
                     conversations: ConversationSpec | None = None) -> list[TraceRecord]:
    """The rows a run replays: the trace file's (default: the packaged trace), or
    multi-turn conversations (:mod:`kvcake.common.conversations`) of ``conversations``."""
    if workload not in WORKLOADS:
        raise InvalidParamsError(f"workload must be one of {', '.join(WORKLOADS)}, got "
                                 f"{workload!r}")
    if workload == "trace":
        return _load_trace(trace)
    if trace:
        raise InvalidParamsError("--trace names rows of a trace; the conversations workload "
                                 "makes its own")
    return conversation_records(conversations or ConversationSpec())


def run_sim(records: Sequence[TraceRecord], config: SimConfig, spec: WorkloadSpec,
            as_json: bool, plot: str | None, out: TextIO) -> int:
    if plot:
        config = replace(config, keep_gaps=True)
    requests = Simulator(config, build_requests(records, spec,
                                                config.profile.block_tokens)).run()
    summary = summarise(config, requests)
    if as_json:
        print_json(summary, out)
    else:
        print_summary(summary, out)
    if plot:
        plot_cdfs(plot, [(f"{config.policy}", requests)], config.slo_ttft_s, config.slo_tbt_s)
    return 0


def run_sim_sweep(records: Sequence[TraceRecord], configs: Sequence[SimConfig],
                  spec: WorkloadSpec, target: float, as_json: bool, plot: str | None,
                  out: TextIO) -> int:
    capacities = [_sweep_one(records, config, spec, target, as_json, out) for config in configs]
    if as_json:
        for capacity in capacities:
            print(json.dumps(_capacity_json(capacity), sort_keys=True), file=out)
    else:
        _print_capacities(capacities, out)
    if plot:
        plot_capacities(plot, capacities)
    return 0


def _sweep_one(records: Sequence[TraceRecord], config: SimConfig, spec: WorkloadSpec,
               target: float, as_json: bool, out: TextIO) -> Capacity:
    def show(probe: Probe) -> None:
        if not as_json:
            label = f"{layout_label(config)} {config.policy}"
            print(f"  {label:>30} speed {probe.speed:8.4f}: {probe.arrival_rate_rps:8.3f} "
                  f"req/s, SLO {probe.slo_attainment:6.1%}", file=out, flush=True)

    return find_capacity(records, config, spec, target, on_probe=show)


def _capacity_json(capacity: Capacity) -> dict[str, Any]:
    best = capacity.best
    return {"config": capacity.label, "target": capacity.target,
            "capacity_speed": best.speed if best else None,
            "capacity_rps": best.arrival_rate_rps if best else None,
            "probes": [vars(p) for p in capacity.probes]}


def _print_capacities(capacities: Sequence[Capacity], out: TextIO) -> None:
    base = capacities[0].best if capacities else None
    print(f"{'configuration':>32}  {'speed':>8}  {'req/s':>8}  {'SLO':>6}  "
          f"vs {capacities[0].label if capacities else ''}", file=out)
    for capacity in capacities:
        best = capacity.best
        if best is None:
            print(f"{capacity.label:>32}  {'-':>8}  {'-':>8}  {'-':>6}  never met "
                  f"{capacity.target:.0%}", file=out)
            continue
        ratio = (f"{best.arrival_rate_rps / base.arrival_rate_rps:.2f}x"
                 if base is not None and base.arrival_rate_rps > 0 else "-")
        print(f"{capacity.label:>32}  {best.speed:8.4f}  {best.arrival_rate_rps:8.3f}  "
              f"{best.slo_attainment:6.1%}  {ratio}", file=out)


def run_sim_profile(bench_json: str | None, base: str, name: str, out: TextIO) -> int:
    """Print a profile: a named one, or ``base`` fitted to ``kvcake bench engine --json``."""
    profile = load_profile(base)
    if bench_json is not None:
        rows = _read_bench_rows(bench_json)
        profile = fit_profile(rows, profile, name)
    print(json.dumps(profile.to_json(), indent=2), file=out)
    return 0


def _load_trace(trace: str | None) -> list[TraceRecord]:
    try:
        return load_trace(trace)
    except OSError as exc:
        raise InvalidParamsError(f"cannot read trace {trace}: {exc.strerror}") from None


def _read_bench_rows(path: str) -> list[dict[str, Any]]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidParamsError(f"cannot read {path}: {exc.strerror}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InvalidParamsError(f"{path} line {number}: not valid JSON "
                                     f"({exc.msg})") from None
    return rows


def run_sim_cache(trace: str | None, capacities: Sequence[int], eviction: str, as_json: bool,
                  out: TextIO) -> int:
    records = _load_trace(trace)
    if not records or not capacities:
        raise InvalidParamsError("nothing to replay: the trace has no rows or no capacity "
                                 "was given")
    replays = [replay_pool(records, capacity, eviction) for capacity in capacities]
    if as_json:
        for replay in replays:
            print(json.dumps(_cache_summary(replay)), file=out)
        return 0
    print(f"{len(records):,} requests, {replays[0].num_blocks:,} block references; "
          f"eviction {eviction}", file=out)
    print(f"{'capacity (blocks)':>18}  {'blocks':>6}  {'tokens':>6}  {'evictions':>9}", file=out)
    for replay in replays:
        capacity = f"{replay.capacity:,}" if replay.capacity else "unbounded"
        print(f"{capacity:>18}  {replay.hit_ratio_blocks:6.3f}  {replay.hit_ratio_tokens:6.3f}  "
              f"{replay.num_evictions:>9,}", file=out)
    return 0


def _cache_summary(replay: CacheReplay) -> dict[str, object]:
    return {"capacity": replay.capacity, "eviction": replay.eviction,
            "num_requests": replay.num_requests, "num_blocks": replay.num_blocks,
            "hit_ratio_blocks": replay.hit_ratio_blocks,
            "hit_ratio_tokens": replay.hit_ratio_tokens, "num_evictions": replay.num_evictions}
