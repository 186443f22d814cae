"""Effective capacity: the highest arrival rate at which a cluster still meets its SLOs.

For each configuration the trace is replayed at speeds found by search: double (or halve)
from 1x until the target attainment is bracketed, then bisect in log space::

    attainment
      1.0 ┤●───●──●
          │         ●        target (0.9) ─ ─ ─ ─ ─
      0.5 ┤           ●
          └──┬───┬───┬───┬── speed
             1   2   4   8        capacity = the fastest speed that met the target

Every probe is a whole deterministic run, so the search is too. Attainment need not fall
monotonically with speed; the search reports the fastest *probed* speed that met the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kvcake.common.errors import InvalidParamsError
from kvcake.common.trace import TraceRecord
from kvcake.sim.report import summarise
from kvcake.sim.simulator import SimConfig, Simulator
from kvcake.sim.workload import WorkloadSpec, build_requests

MIN_SPEED, MAX_SPEED = 1 / 64, 64.0


@dataclass(frozen=True)
class Probe:
    speed: float
    arrival_rate_rps: float
    slo_attainment: float


@dataclass(frozen=True)
class Capacity:
    """A configuration's search: every probe, and the best speed that met the target."""

    label: str
    target: float
    probes: tuple[Probe, ...]

    @property
    def best(self) -> Probe | None:
        met = [p for p in self.probes if p.slo_attainment >= self.target]
        return max(met, key=lambda p: p.speed) if met else None


def parse_layout(text: str) -> tuple[int, int, int]:
    """``8P+8D`` → (8, 8, 0); ``16C`` → (0, 0, 16): prefill, decode and colocated counts."""
    counts = {"P": 0, "D": 0, "C": 0}
    for part in text.upper().replace(" ", "").split("+"):
        digits = part[:-1]
        if len(part) < 2 or part[-1] not in counts or not (digits.isascii() and digits.isdigit()):
            raise InvalidParamsError(f"layout {text!r}: write parts like 8P+8D or 16C")
        counts[part[-1]] += int(part[:-1])
    return counts["P"], counts["D"], counts["C"]


def layout_label(config: SimConfig) -> str:
    if config.num_colocated:
        return f"{config.num_colocated}C"
    return f"{config.num_prefill}P+{config.num_decode}D"


def find_capacity(records: Sequence[TraceRecord], config: SimConfig, spec: WorkloadSpec,
                  target: float, steps: int = 6,
                  on_probe: Callable[[Probe], None] | None = None) -> Capacity:
    """Search the speed (see the module docstring); ``steps`` bisections once bracketed."""
    if not 0 < target <= 1:
        raise InvalidParamsError(f"target attainment must be in (0, 1], got {target}")
    probes: dict[float, Probe] = {}

    def probe(speed: float) -> bool:
        if speed not in probes:
            requests = build_requests(records, replace(spec, speed=speed),
                                      config.profile.block_tokens)
            summary = summarise(config, Simulator(config, requests).run())
            probes[speed] = Probe(speed, summary["arrival_rate_rps"] or 0.0,
                                  summary["slo_attainment"])
            if on_probe is not None:
                on_probe(probes[speed])
        return probes[speed].slo_attainment >= target

    low, high = _bracket(probe)
    for _ in range(steps if low and high else 0):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if probe(middle) else (low, middle)
    label = f"{layout_label(config)} {config.policy}"
    return Capacity(label, target, tuple(sorted(probes.values(), key=lambda p: p.speed)))


def _bracket(probe: Callable[[float], bool]) -> tuple[float, float]:
    """(a speed that met the target, a faster one that did not); 0 for a missing side."""
    speed = 1.0
    if probe(speed):
        while speed < MAX_SPEED and probe(speed * 2):
            speed *= 2
        return speed, (speed * 2 if speed < MAX_SPEED else 0.0)
    while speed > MIN_SPEED and not probe(speed / 2):
        speed /= 2
    return (speed / 2 if speed > MIN_SPEED else 0.0), speed


def plot_capacities(path: str | Path, capacities: Sequence[Capacity]) -> None:
    """SLO attainment against arrival rate, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for capacity in capacities:
        axes.plot([p.arrival_rate_rps for p in capacity.probes],
                  [p.slo_attainment for p in capacity.probes], marker="o", label=capacity.label)
    if capacities:
        axes.axhline(capacities[0].target, color="grey", linestyle="--", linewidth=1)
    axes.set_xscale("log")
    axes.set_xlabel("arrival rate (requests/s)")
    axes.set_ylabel("SLO attainment")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
