"""Trace rows to simulated requests: which rows, when they arrive, and their block keys.

A trace names each 512-token block by a prefix hash id. Instances cache blocks of the
profile's ``block_tokens`` (``b``) instead; instance block ``j`` covers tokens
``[j·b, (j+1)·b)``, and its content (with everything before it) is fixed by the trace block
holding its last token, so its key is ``"<that trace id>.<j>"``::

    trace (T = 512)   [   id 7    ][   id 9    ][ id 4 ]
    b = 256           [7.0 ][7.1  ][9.2 ][9.3  ]           (the partial tail has no key)
    b = 1024          [   9.0                  ]

Rows that share leading trace ids share exactly the instance keys those ids cover.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from kvcake.common.errors import InvalidParamsError
from kvcake.common.trace import (
    TRACE_BLOCK_TOKENS,
    TraceRecord,
    scale_record,
    scaled_block_tokens,
)
from kvcake.sim.request import SimRequest


@dataclass(frozen=True)
class WorkloadSpec:
    """Which rows to replay, and how.

    speed: arrivals come ``speed`` times faster than the trace's clock (> 0).
    start_row, limit: rows ``start_row`` .. ``start_row + limit - 1`` (``None``: to the end).
    sample: keep each of those rows with this probability, seeded by ``seed`` (0 < x <= 1).
    input_scale, output_scale, max_output_tokens: shrink rows as ``kvcake bench serve``
        does (:func:`kvcake.common.trace.scale_record`); 1, 1, ``None`` keep them.
    output_tokens: every request generates exactly this many tokens (``None``: the row's).
    """

    speed: float = 1.0
    start_row: int = 0
    limit: int | None = None
    sample: float = 1.0
    input_scale: float = 1.0
    output_scale: float = 1.0
    max_output_tokens: int | None = None
    output_tokens: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        checks = ((self.speed > 0, f"speed must be > 0, got {self.speed}"),
                  (self.start_row >= 0, f"start row must be >= 0, got {self.start_row}"),
                  (self.limit is None or self.limit >= 1,
                   f"limit must be >= 1, got {self.limit}"),
                  (0 < self.sample <= 1, f"sample must be in (0, 1], got {self.sample}"),
                  (self.output_tokens is None or self.output_tokens >= 1,
                   f"output tokens must be >= 1, got {self.output_tokens}"))
        for ok, message in checks:
            if not ok:
                raise InvalidParamsError(message)

    @property
    def scaled(self) -> bool:
        return (self.input_scale, self.output_scale, self.max_output_tokens) != (1.0, 1.0, None)


def select_rows(records: Sequence[TraceRecord], spec: WorkloadSpec) -> list[int]:
    """Row numbers to replay, in order."""
    if spec.start_row >= len(records):
        raise InvalidParamsError(f"start row {spec.start_row} is past the trace's "
                                 f"{len(records)} rows")
    end = len(records) if spec.limit is None else min(len(records), spec.start_row + spec.limit)
    rows = range(spec.start_row, end)
    if spec.sample == 1.0:
        return list(rows)
    rng = random.Random(spec.seed)
    return [row for row in rows if rng.random() < spec.sample]


def build_requests(records: Sequence[TraceRecord], spec: WorkloadSpec,
                   block_tokens: int) -> list[SimRequest]:
    """One :class:`SimRequest` per selected row, arriving at its (sped-up) trace time from
    the first selected row's."""
    rows = select_rows(records, spec)
    if not rows:
        raise InvalidParamsError("the sample kept no row; raise --sample or --limit")
    trace_block = scaled_block_tokens(spec.input_scale) if spec.scaled else TRACE_BLOCK_TOKENS
    first_ms = records[rows[0]].timestamp_ms
    requests = []
    for row in rows:
        record = records[row]
        if spec.scaled:
            record = scale_record(record, spec.input_scale, spec.output_scale,
                                  spec.max_output_tokens)
        output = spec.output_tokens or max(1, record.output_length)
        requests.append(SimRequest(
            request_id=f"r{row}", row=row,
            arrival_s=(record.timestamp_ms - first_ms) / 1000 / spec.speed,
            num_prompt_tokens=record.input_length, num_output_tokens=output,
            block_keys=block_keys(record, trace_block, block_tokens), block_tokens=block_tokens))
    return requests


def block_keys(record: TraceRecord, trace_block: int, block_tokens: int) -> tuple[str, ...]:
    """Keys of the record's full blocks of ``block_tokens`` (see the module docstring)."""
    if trace_block < 1 or block_tokens < 1:
        raise InvalidParamsError(f"block sizes must be >= 1, got {trace_block} and "
                                 f"{block_tokens}")
    last = len(record.hash_ids) - 1
    return tuple(f"{record.hash_ids[min(last, ((j + 1) * block_tokens - 1) // trace_block)]}.{j}"
                 for j in range(record.input_length // block_tokens))
