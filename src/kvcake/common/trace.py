"""Mooncake request traces: load and check a JSONL file, scale rows, make up their prompts.

A trace row gives arrival time, lengths and one hash id per 512-token prompt block (an id
names the block *and everything before it*; the packaged ``conversation_trace.jsonl`` is
described in ``kvcake/data/traces/README.md``). No tokens are published, so a replay derives
each block's tokens from its id alone: rows that share leading ids share leading tokens,
which is all a prefix cache can see.

Scaling keeps that structure. Every block shrinks by the same factor, so a row of ``n`` ids
still has ``n`` blocks and shares exactly as many of them as before::

    hash_ids      [ 0  ][ 7  ][ 8  ][ 9 ]        n = 4 ids
    trace         | 512 | 512 | 512 |102|        input_length = 3 * 512 + 102
    scale 0.05    |26|26|26|5|                   3 * round(512 * 0.05) + round(102 * 0.05)

Pure and small on purpose: the benchmark client and the simulator both use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import IO, Any

from kvcake.common.errors import InvalidParamsError

TRACE_BLOCK_TOKENS = 512
TRACE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")
PACKAGED_TRACE = "conversation_trace.jsonl"
_U32 = struct.Struct("<I")


class TraceError(InvalidParamsError):
    """A trace file breaks the format; the message names the file, the line and the field."""


@dataclass(frozen=True)
class TraceRecord:
    """One request of a trace.

    timestamp_ms: arrival, milliseconds after the trace's start.
    input_length / output_length: prompt and reply lengths, tokens.
    hash_ids: one id per prompt block (512 tokens in a file; scaled records use smaller
        blocks, see :func:`scale_record`); an id names a block and everything before it.
    """

    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_trace(path: str | Path | None = None, limit: int | None = None) -> list[TraceRecord]:
    """Rows of a trace file (``None``: the packaged conversation trace), at most ``limit``.

    Every row read is checked: exactly the four keys, integer types, non-negative values, a
    prompt of at least one token, ``len(hash_ids) == ceil(input_length / 512)`` and
    timestamps that never go back. Raises :class:`TraceError` naming file, line and field,
    or ``InvalidParamsError`` for a bad ``limit``; ``OSError`` if the file cannot be read.
    """
    if limit is not None and limit < 0:
        raise InvalidParamsError(f"limit must be >= 0, got {limit}")
    with _open_trace(path) as (name, lines):
        return _parse_lines(name, lines, limit)


@contextmanager
def _open_trace(path: str | Path | None) -> Iterator[tuple[str, IO[str]]]:
    if path is None:
        source = resources.files("kvcake.data").joinpath("traces", PACKAGED_TRACE)
        with source.open("r", encoding="utf-8") as lines:
            yield f"packaged {PACKAGED_TRACE}", lines
    else:
        with Path(path).open(encoding="utf-8") as lines:
            yield str(path), lines


def _parse_lines(name: str, lines: Iterable[str], limit: int | None) -> list[TraceRecord]:
    records: list[TraceRecord] = []
    for number, line in enumerate(lines, start=1):
        if limit is not None and len(records) >= limit:
            break
        if not line.strip():
            continue  # a trailing newline or blank line is not a row
        record = _parse_row(name, number, line)
        if records and record.timestamp_ms < records[-1].timestamp_ms:
            raise TraceError(f"{name} line {number}: field 'timestamp': {record.timestamp_ms} "
                             f"is before the previous row's {records[-1].timestamp_ms}")
        records.append(record)
    return records


def _parse_row(name: str, number: int, line: str) -> TraceRecord:
    where = f"{name} line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise TraceError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    _check_keys(where, row)
    record = TraceRecord(_int_field(where, row, "timestamp", 0),
                         _int_field(where, row, "input_length", 1),
                         _int_field(where, row, "output_length", 0),
                         _hash_ids(where, row["hash_ids"]))
    expected = math.ceil(record.input_length / TRACE_BLOCK_TOKENS)
    if len(record.hash_ids) != expected:
        raise TraceError(f"{where}: field 'hash_ids': {len(record.hash_ids)} ids, but "
                         f"input_length {record.input_length} needs ceil(/512) = {expected}")
    return record


def _check_keys(where: str, row: dict[str, Any]) -> None:
    missing = [key for key in TRACE_FIELDS if key not in row]
    if missing:
        raise TraceError(f"{where}: field {missing[0]!r} is missing")
    extra = sorted(key for key in row if key not in TRACE_FIELDS)
    if extra:
        raise TraceError(f"{where}: field {extra[0]!r} is not part of the format "
                         f"(expected exactly {', '.join(TRACE_FIELDS)})")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def _int_field(where: str, row: dict[str, Any], key: str, minimum: int) -> int:
    value = row[key]
    if not _is_int(value) or value < minimum:
        raise TraceError(f"{where}: field {key!r}: expected an integer >= {minimum}, "
                         f"got {value!r}")
    return int(value)


def _hash_ids(where: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(_is_int(i) and i >= 0 for i in value):
        raise TraceError(f"{where}: field 'hash_ids': expected a list of integers >= 0, "
                         f"got {str(value)[:60]}")
    return tuple(value)


def _check_token_range(block_tokens: int, vocab_size: int, first_token_id: int) -> None:
    if block_tokens < 1:
        raise InvalidParamsError(f"block_tokens must be >= 1, got {block_tokens}")
    if not 0 <= first_token_id < vocab_size <= 1 << 32:
        raise InvalidParamsError(f"need 0 <= first_token_id < vocab_size <= 2**32, got "
                                 f"first_token_id {first_token_id}, vocab_size {vocab_size}")


def trace_window(records: Sequence[TraceRecord], start_row: int, num_requests: int,
                 duration_s: float, speed: float = 1.0) -> list[tuple[int, TraceRecord]]:
    """``(row, record)`` from row ``start_row`` on (0-based): at most ``num_requests`` rows,
    each arriving within ``duration_s`` seconds of the first once the trace's clock runs
    ``speed`` times faster. ``InvalidParamsError`` if ``start_row`` is past the end."""
    if start_row >= len(records):
        raise InvalidParamsError(f"start row {start_row} is past the trace's "
                                 f"{len(records)} rows")
    first = records[start_row].timestamp_ms
    window: list[tuple[int, TraceRecord]] = []
    for row in range(start_row, min(len(records), start_row + num_requests)):
        if (records[row].timestamp_ms - first) / 1000 / speed > duration_s:
            break  # rows are sorted by time: every later one is further out
        window.append((row, records[row]))
    return window


def prefix_reuse(records: Iterable[TraceRecord]) -> float:
    """The share of prompt blocks a prefix cache holding every earlier record could serve:
    each record's leading blocks whose ids an earlier record had (an id names its block and
    everything before it). 0.0 for no blocks."""
    seen: set[int] = set()
    reused = total = 0
    for record in records:
        for hash_id in record.hash_ids:
            if hash_id not in seen:
                break
            reused += 1
        total += len(record.hash_ids)
        seen.update(record.hash_ids)
    return reused / total if total else 0.0


def most_reused_start(records: Sequence[TraceRecord], num_requests: int, duration_s: float,
                      speed: float = 1.0, stride: int = 10) -> int:
    """The start row, a multiple of ``stride``, of the window (as :func:`trace_window` cuts
    it) with the highest :func:`prefix_reuse`; the earliest of equals."""
    if stride < 1 or not records:
        raise InvalidParamsError(f"need a stride >= 1 and some records, got stride {stride} "
                                 f"and {len(records)} records")
    starts = range(0, max(1, len(records) - num_requests + 1), stride)
    return max(starts, key=lambda start: (prefix_reuse(
        record for _, record in trace_window(records, start, num_requests, duration_s, speed)),
        -start))


def block_token_ids(hash_id: int, block_tokens: int, vocab_size: int,
                    first_token_id: int = 0) -> list[int]:
    """The ``block_tokens`` token ids of block ``hash_id``, each in
    ``[first_token_id, vocab_size)``.

    Word ``i`` of SHAKE-256(``hash_id`` as 8 little-endian bytes), read as a little-endian
    u32, gives token ``first_token_id + word % (vocab_size - first_token_id)``: the same in
    every process, machine and language (never Python's per-process ``hash()``).
    """
    _check_token_range(block_tokens, vocab_size, first_token_id)
    if not 0 <= hash_id < 1 << 64:
        raise InvalidParamsError(f"hash id must be 0..2**64-1, got {hash_id}")
    span = vocab_size - first_token_id
    stream = hashlib.shake_256(hash_id.to_bytes(8, "little")).digest(4 * block_tokens)
    return [first_token_id + word % span for (word,) in _U32.iter_unpack(stream)]


def synthesize_prompt(record: TraceRecord, block_tokens: int, vocab_size: int,
                      first_token_id: int = 0) -> list[int]:
    """``record.input_length`` token ids: the blocks of its hash ids, in order, cut to length.

    ``block_tokens`` is the block size the record uses (512 for a file row, or
    :func:`scaled_block_tokens` after :func:`scale_record`). Ids below ``first_token_id`` are
    never produced (keep a model's special tokens out). Raises ``InvalidParamsError`` on a
    bad size or range, or when the hash ids cover fewer tokens than ``input_length``.
    """
    _check_token_range(block_tokens, vocab_size, first_token_id)
    if len(record.hash_ids) * block_tokens < record.input_length:
        raise InvalidParamsError(f"{len(record.hash_ids)} blocks of {block_tokens} tokens "
                                 f"cannot hold input_length {record.input_length}")
    tokens: list[int] = []
    for hash_id in record.hash_ids:
        if len(tokens) >= record.input_length:
            break
        tokens += block_token_ids(hash_id, block_tokens, vocab_size, first_token_id)
    return tokens[: record.input_length]


def scaled_block_tokens(input_scale: float, block_tokens: int = TRACE_BLOCK_TOKENS) -> int:
    """Tokens per block after scaling prompts by ``input_scale``: ``round(block * scale)``,
    at least 1 (ties round to even, as Python's ``round``)."""
    if not input_scale > 0:
        raise InvalidParamsError(f"input scale must be > 0, got {input_scale}")
    return max(1, round(block_tokens * input_scale))


def scale_record(record: TraceRecord, input_scale: float, output_scale: float,
                 max_output_tokens: int | None = None,
                 block_tokens: int = TRACE_BLOCK_TOKENS) -> TraceRecord:
    """``record`` with shorter (or longer) prompt and reply, same time and hash ids.

    Full blocks become :func:`scaled_block_tokens` tokens; the last block ``round(tail *
    input_scale)`` tokens, kept within 1..scaled block, so the record still has one block
    per hash id and prefix sharing is unchanged (see the module docstring). The reply becomes
    ``round(output_length * output_scale)`` tokens, at least 1, at most
    ``max_output_tokens``. Raises ``InvalidParamsError`` on a non-positive scale or cap, or
    when the record's length does not fit its ids at ``block_tokens``.
    """
    new_block = scaled_block_tokens(input_scale, block_tokens)
    if not output_scale > 0 or (max_output_tokens is not None and max_output_tokens < 1):
        raise InvalidParamsError(f"need output scale > 0 and max output tokens >= 1, got "
                                 f"{output_scale} and {max_output_tokens}")
    full = len(record.hash_ids) - 1
    tail = record.input_length - full * block_tokens
    if full < 0 or not 1 <= tail <= block_tokens:
        raise InvalidParamsError(f"input_length {record.input_length} does not match "
                                 f"{len(record.hash_ids)} blocks of {block_tokens} tokens")
    new_tail = min(new_block, max(1, round(tail * input_scale)))
    output = max(1, round(record.output_length * output_scale))
    if max_output_tokens is not None:
        output = min(output, max_output_tokens)
    return replace(record, input_length=full * new_block + new_tail, output_length=output)
