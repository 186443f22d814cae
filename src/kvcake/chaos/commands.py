"""``kvcake chaos``: flags onto the runner; exit 1 when a must-be-0 column is not."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _cmd_chaos(args: argparse.Namespace) -> int:
    from kvcake.chaos.report import print_json, print_table, verdict
    from kvcake.chaos.runner import run_chaos, select
    from kvcake.chaos.scenario import ChaosSettings

    names = select(args.scenarios or "")
    started = time.monotonic()
    results = run_chaos(names, ChaosSettings(args.seed, args.quick), progress=sys.stderr)
    if args.json:
        print_json(results, sys.stdout)
    else:
        print_table(results, sys.stdout)
    bad = verdict(results)
    for line in bad:
        print(f"kvcake chaos: FAILED {line}", file=sys.stderr)
    print(f"kvcake chaos: {len(results)} scenarios, seed {args.seed}, "
          f"{time.monotonic() - started:.0f} s", file=sys.stderr)
    return 1 if bad else 0


def add_chaos_command(commands: Subparsers) -> None:
    from kvcake.chaos.runner import scenario_names

    chaos = commands.add_parser(
        "chaos", help="fault-injection suite: kill nodes, masters and instances under load",
        description="Runs each scenario (its own processes, on loopback or network "
        "namespaces) under a steady seeded workload, injects its fault, and checks: no wrong "
        "bytes, no lost object that had a surviving replica, no request past its deadline, "
        "integrity clean.")
    chaos.add_argument("--quick", action="store_true", help="the short form (CI)")
    chaos.add_argument("--seed", type=int, default=0, help="names the workload (default 0)")
    chaos.add_argument("--scenarios", help="comma list (default: all): "
                       + ",".join(scenario_names()))
    chaos.add_argument("--json", action="store_true", help="one JSON object per scenario")
    chaos.set_defaults(run=_cmd_chaos)
