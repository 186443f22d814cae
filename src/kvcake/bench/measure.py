"""Timing helpers shared by the benchmarks: repeated runs, medians, a plain-text table."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def throughput(step: Callable[[], int], reps: int, min_seconds: float) -> float:
    """Median over ``reps`` runs of bytes/second, each run repeating ``step`` (which returns
    the bytes it moved) for at least ``min_seconds``."""
    step()  # warm up connections, mappings and caches
    rates = []
    for _ in range(reps):
        moved, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_seconds:
            moved += step()
        rates.append(moved / elapsed)
    return statistics.median(rates)


def human_size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def print_rows(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]],
               as_json: bool) -> None:
    """Rows as JSON lines, or as an aligned table with the given (key, heading) columns."""
    if as_json:
        for row in rows:
            print(json.dumps(row), flush=True)
        return
    cells = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    print("  ".join(h.rjust(w) for (_, h), w in zip(columns, widths, strict=True)))
    for line in cells:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)), flush=True)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 1000 else f"{value:,.0f}"
    return str(value)
