"""One scenario in a process of its own: ``python -m kvcake.chaos.driver NAME --seed N``.

The runner starts one driver per scenario (inside namespace ``a`` of a pair it made, for
scenarios that need one), so a scenario's processes, threads and sockets end with it. The
driver prints its :class:`ScenarioResult` as one JSON line, last, on stdout. SIGTERM (the
runner's deadline) unwinds the scenario, which stops every process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from kvcake.chaos.scenario import ChaosSettings, Scenario
from kvcake.chaos.scenarios import STORE_SCENARIOS
from kvcake.common.log import setup_logging
from kvcake.ops import NetnsPair

RESULT_PREFIX = "chaos-result "


def scenario_types() -> dict[str, type[Scenario]]:
    from kvcake.chaos.leader import LEADER_SCENARIOS
    from kvcake.chaos.serving import SERVING_SCENARIOS

    found: list[type[Scenario]] = [*STORE_SCENARIOS, *LEADER_SCENARIOS, *SERVING_SCENARIOS]
    return {s.name: s for s in found}


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvcake.chaos.driver")
    parser.add_argument("scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--netns-pid", type=int, help="the runner's namespace pair")
    parser.add_argument("--netns-tag", default="kvchaos")
    args = parser.parse_args(argv)
    setup_logging("ERROR")  # the faults make clients warn by the hundred
    signal.signal(signal.SIGTERM, _terminate)
    hosts = NetnsPair(args.netns_tag, args.netns_pid) if args.netns_pid else None
    scenario = scenario_types()[args.scenario](ChaosSettings(args.seed, args.quick), hosts)
    result = asyncio.run(scenario.run())
    print(RESULT_PREFIX + json.dumps(dataclasses.asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
