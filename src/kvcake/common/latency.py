"""Latency statistics with the Mooncake paper's definitions, shared by the live benchmark and
the simulator so that their numbers mean the same thing.

* **TBT of a request**: the mean of its slowest 10 % of token gaps (at least one gap).
* **percentiles**: nearest rank, so every reported value was observed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from kvcake.common.errors import InvalidParamsError

SLOWEST_PART = 10  # the paper's TBT: the slowest tenth of a request's gaps


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least ``pct`` % of ``values`` at or
    below it (``pct`` 0 gives the minimum). ``None`` for no values; ``InvalidParamsError``
    for ``pct`` outside 0..100."""
    if not 0 <= pct <= 100:
        raise InvalidParamsError(f"percentile must be 0..100, got {pct}")
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct * len(ordered) / 100))  # pct * n first: exact for integers
    return ordered[rank - 1]


def slowest_count(num_gaps: int) -> int:
    """How many gaps the paper's TBT averages: ``ceil(10 %)``, at least one."""
    return max(1, -(-num_gaps // SLOWEST_PART))  # integer ceil: 30 * 0.1 is not 3 in floats


def slowest_gaps_mean(gaps: Sequence[float]) -> float | None:
    """Mean of the slowest ``ceil(10 %)`` of ``gaps`` (at least one); ``None`` if empty."""
    if not gaps:
        return None
    return statistics.fmean(sorted(gaps, reverse=True)[:slowest_count(len(gaps))])
