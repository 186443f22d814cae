"""The table ``kvcake chaos`` prints, and its JSON form (one object per scenario)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TextIO

from kvcake.chaos.scenario import ScenarioResult

COLUMNS = ("scenario", "ops", "errors by kind", "wrong bytes", "lost objects", "hangs",
           "recover s", "integrity")


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in errors.items()) or "-"


def _recover(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def rows(results: Sequence[ScenarioResult]) -> list[tuple[str, ...]]:
    return [(r.name, str(r.operations), _errors(r.errors), str(r.wrong_bytes),
             str(r.lost_objects), str(r.hangs), _recover(r.recover_s), r.integrity)
            for r in results]


def print_table(results: Sequence[ScenarioResult], out: TextIO) -> None:
    table = [COLUMNS, *rows(results)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for row in table:
        cells = [cell.ljust(w) if i in (0, 2, 7) else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip(), file=out)
    for r in results:
        notes = [f"{r.checked} objects read back"] if r.checked else []
        notes += r.notes
        notes.append(f"{r.wall_s:.0f} s")
        print(f"  {r.name}: {'; '.join(notes)}", file=out)


def print_json(results: Sequence[ScenarioResult], out: TextIO) -> None:
    for result in results:
        print(json.dumps(dataclasses.asdict(result)), file=out)


def verdict(results: Sequence[ScenarioResult]) -> list[str]:
    """Every must-be-0 column that is not, as ``scenario: why``."""
    return [f"{r.name}: {why}" for r in results for why in r.failures()]
