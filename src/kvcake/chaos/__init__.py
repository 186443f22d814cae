"""Fault injection (``kvcake chaos``): scenarios that kill storage nodes, masters and serving
instances, flood the pool or cut a node off the network under a steady seeded workload, and
check that no byte came back wrong, no object with a surviving replica was lost, nothing
hung past its deadline and nothing leaked."""

from kvcake.chaos.runner import run_chaos, scenario_names
from kvcake.chaos.scenario import ChaosSettings, ScenarioResult

__all__ = ["ChaosSettings", "ScenarioResult", "run_chaos", "scenario_names"]
