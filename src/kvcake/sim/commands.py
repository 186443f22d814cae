"""``kvcake sim`` and its subcommands (``sweep``, ``cache``, ``profile``): flags onto configs."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from kvcake.common.errors import KvcakeError

if TYPE_CHECKING:
    from kvcake.common.trace import TraceRecord
    from kvcake.sim.simulator import SimConfig
    from kvcake.sim.workload import WorkloadSpec

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

TRACE_HELP = "Mooncake-format JSONL (default: the packaged conversation trace)"


def _cmd_sim(args: argparse.Namespace) -> int:
    from kvcake.sim.run import run_sim

    return run_sim(_records(args), _config(args, args.prefill, args.decode, args.colocated,
                                           args.policy), _spec(args), args.json, args.plot,
                   sys.stdout)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from kvcake.sim.run import run_sim_sweep
    from kvcake.sim.sweep import parse_layout

    configs = [_config(args, *parse_layout(layout), policy)
               for layout in args.layouts.split(",") for policy in args.policies.split(",")]
    return run_sim_sweep(_records(args), configs, _spec(args), args.target, args.json, args.plot,
                         sys.stdout)


def _config(args: argparse.Namespace, prefill: int, decode: int, colocated: int,
            policy: str) -> SimConfig:
    from kvcake.sim.profile import load_profile
    from kvcake.sim.simulator import SimConfig

    try:
        pool = None if args.pool_capacity is None else int(args.pool_capacity)
    except ValueError:
        raise KvcakeError(f"--pool-capacity takes a block count (0 = unbounded), got "
                          f"{args.pool_capacity!r}") from None
    return SimConfig(load_profile(args.profile), num_prefill=prefill, num_decode=decode,
                     num_colocated=colocated, policy=policy, admission=args.admission,
                     balancing_threshold=args.threshold, slo_ttft_s=args.slo_ttft,
                     slo_tbt_s=args.slo_tbt, pool_capacity_blocks=pool,
                     pull_from_instances=not args.no_instance_pulls, eviction=args.eviction,
                     reject_at_decode=args.reject_at_decode, seed=args.seed,
                     drain_fit=not args.no_drain_fit)


def _records(args: argparse.Namespace) -> list[TraceRecord]:
    from kvcake.common.conversations import ConversationSpec
    from kvcake.sim.run import workload_records

    if args.workload != "conversations":
        return workload_records(args.trace, args.workload)
    # two sessions open a second, each turn a minute after the last: with 5 turns, about
    # the packaged trace's 3 requests a second
    spec = ConversationSpec(sessions=args.sessions, turns=args.turns,
                            open_s=args.sessions / 2, think_s=60.0, seed=args.seed)
    return workload_records(args.trace, "conversations", spec)


def _spec(args: argparse.Namespace) -> WorkloadSpec:
    from kvcake.sim.workload import WorkloadSpec

    return WorkloadSpec(speed=args.speed, start_row=args.start_row, limit=args.limit,
                        sample=args.sample, input_scale=args.input_scale,
                        output_scale=args.output_scale, max_output_tokens=args.max_output,
                        output_tokens=args.output_tokens, seed=args.seed)


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", help=TRACE_HELP)
    parser.add_argument("--profile", default="llama2-70b-a800", help="a profile name "
                        "(llama2-70b-a800, smollm2-cpu, smollm2-cpu-up) or a JSON file (default "
                        "llama2-70b-a800)")
    parser.add_argument("--admission", default="none", help="none (default), ttft, early, "
                        "predictive")
    parser.add_argument("--threshold", type=float, default=2.0,
                        help="Algorithm 1's balancing threshold (default 2)")
    parser.add_argument("--slo-ttft", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--slo-tbt", type=float, default=0.1, help="seconds (default 0.1)")
    parser.add_argument("--pool-capacity", help="a shared store tier of this many blocks "
                        "(0 = unbounded; default: none, prefixes move between instances)")
    parser.add_argument("--no-instance-pulls", action="store_true",
                        help="pull prefixes from the pool tier only (as kvcake up does)")
    parser.add_argument("--eviction", default="lru", help="lru (default) or fifo")
    parser.add_argument("--no-drain-fit", action="store_true",
                        help="price instance queues by the cost model alone (default: the "
                        "Conductor learns how each prefill instance drains, as a live one)")
    parser.add_argument("--reject-at-decode", action="store_true", help="a decode instance "
                        "refuses a request whose KV arrives while it is full (the paper's "
                        "baseline)")
    parser.add_argument("--seed", type=int, default=0, help="random policy and --sample")
    _add_workload_flags(parser)
    parser.add_argument("--json", action="store_true", help="JSON output")
    parser.add_argument("--plot", help="write a PNG here")


def _add_workload_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="trace", choices=("trace", "conversations"),
                        help="trace (the --trace file's rows; default) or conversations "
                        "(multi-turn sessions sharing system prompts, each turn extending "
                        "the last prompt)")
    parser.add_argument("--sessions", type=int, default=200,
                        help="with --workload conversations: sessions (default 200)")
    parser.add_argument("--turns", type=int, default=5,
                        help="with --workload conversations: turns per session (default 5)")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="arrivals this many times faster than the trace (default 1)")
    parser.add_argument("--start-row", type=int, default=0, help="first row (default 0)")
    parser.add_argument("--limit", type=int, help="at most this many rows")
    parser.add_argument("--sample", type=float, default=1.0,
                        help="keep each row with this probability (default 1)")
    parser.add_argument("--input-scale", type=float, default=1.0,
                        help="scale prompts as kvcake bench serve does (default 1)")
    parser.add_argument("--output-scale", type=float, default=1.0, help="scale replies "
                        "(default 1)")
    parser.add_argument("--max-output", type=int, help="cap replies at this many tokens")
    parser.add_argument("--output-tokens", type=int, help="every reply exactly this long")


def _cmd_sim_cache(args: argparse.Namespace) -> int:
    from kvcake.sim.run import run_sim_cache

    try:
        capacities = [int(c) for c in args.capacity.split(",")]
    except ValueError:
        raise KvcakeError(f"--capacity takes block counts like 0,10000; got "
                          f"{args.capacity!r}") from None
    return run_sim_cache(args.trace, capacities, args.eviction, args.json, sys.stdout)


def _cmd_sim_profile(args: argparse.Namespace) -> int:
    from kvcake.sim.run import run_sim_profile

    return run_sim_profile(args.bench, args.base, args.name, sys.stdout)


def _cmd_sim_paper(args: argparse.Namespace) -> int:
    from kvcake.sim.paper import run_paper

    return run_paper(args.out, args.quick, sys.stdout)


def add_sim_commands(commands: Subparsers) -> None:
    sim = commands.add_parser("sim", help="trace-driven cluster simulation", allow_abbrev=False)
    sim.add_argument("--prefill", type=int, default=8, help="prefill instances (default 8)")
    sim.add_argument("--decode", type=int, default=8, help="decode instances (default 8)")
    sim.add_argument("--colocated", type=int, default=0,
                     help="colocated instances (use with --prefill 0 --decode 0)")
    sim.add_argument("--policy", default="kvcache_centric", help="random, round_robin, "
                     "least_loaded, cache_aware, kvcache_centric (default)")
    _add_cluster_flags(sim)
    sim.set_defaults(run=_cmd_sim)
    sim_cmds = sim.add_subparsers(dest="sim_command")

    sweep = sim_cmds.add_parser("sweep", help="effective capacity: the fastest replay that "
                                "meets the SLOs, per configuration")
    sweep.add_argument("--layouts", default="8P+8D,16C",
                       help="comma list like 8P+8D,12P+4D,16C (default 8P+8D,16C)")
    sweep.add_argument("--policies", default="kvcache_centric", help="comma list")
    sweep.add_argument("--target", type=float, default=0.9,
                       help="SLO attainment to meet (default 0.9)")
    _add_cluster_flags(sweep)
    sweep.set_defaults(run=_cmd_sweep)

    cache = sim_cmds.add_parser("cache", help="prefix hit ratio of one global pool")
    cache.add_argument("--trace", help=TRACE_HELP)
    cache.add_argument("--capacity", default="0", help="pool size in blocks, a comma list "
                       "(0 = unbounded; default 0)")
    cache.add_argument("--eviction", default="lru", help="lru (default) or fifo")
    cache.add_argument("--json", action="store_true", help="one JSON object per capacity")
    cache.set_defaults(run=_cmd_sim_cache)

    profile = sim_cmds.add_parser("profile", help="print a profile, or fit one to "
                                  "kvcake bench engine --json output")
    profile.add_argument("--bench", help="a file of kvcake bench engine --json output")
    profile.add_argument("--base", default="smollm2-cpu", help="the profile to start from "
                         "(default smollm2-cpu)")
    profile.add_argument("--name", default="fitted", help="name of the fitted profile")
    profile.set_defaults(run=_cmd_sim_profile)

    paper = sim_cmds.add_parser("paper", help="rerun the Mooncake papers' simulated results")
    paper.add_argument("--out", default="docs", help="folder for sim-paper.png (default docs)")
    paper.add_argument("--quick", action="store_true", help="the first 3,000 rows only")
    paper.set_defaults(run=_cmd_sim_paper)
