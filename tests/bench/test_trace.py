"""Trace loading, checking, windows, scaling and made-up prompts (``kvcake.common.trace``)."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import pytest

from kvcake.common.errors import InvalidParamsError
from kvcake.common.trace import (
    TRACE_BLOCK_TOKENS,
    TraceError,
    TraceRecord,
    block_token_ids,
    load_trace,
    scale_record,
    scaled_block_tokens,
    synthesize_prompt,
    trace_window,
)

SMOLLM2_VOCAB, FIRST_ID = 49152, 17
GOOD_ROW = {"timestamp": 5, "input_length": 1025, "output_length": 7, "hash_ids": [1, 2, 3]}


def test_packaged_trace_is_the_released_file_and_matches_its_statistics() -> None:
    packaged = resources.files("kvcake.data").joinpath("traces", "conversation_trace.jsonl")
    assert hashlib.sha256(packaged.read_bytes()).hexdigest() == (
        "b8cbb061a85206d729d91cdc2981f43c9e0d99209dce588d3af5f7934408b9df")
    records = load_trace()
    assert len(records) == 12_031
    assert round(sum(r.input_length for r in records) / len(records), 1) == 12_035.1
    assert sum(len(r.hash_ids) for r in records) == 288_500
    assert len({i for r in records for i in r.hash_ids}) == 182_790
    assert records[0] == TraceRecord(0, 6758, 500, tuple(range(14)))
    assert records[-1].timestamp_ms <= 3_536_999


def test_limit_reads_only_the_first_rows() -> None:
    assert load_trace(limit=3) == load_trace()[:3]
    assert load_trace(limit=0) == []
    with pytest.raises(InvalidParamsError, match="limit must be >= 0"):
        load_trace(limit=-1)


def _write(tmp_path: Path, *rows: object) -> Path:
    path = tmp_path / "trace.jsonl"
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_good_file_loads_and_blank_lines_are_not_rows(tmp_path: Path) -> None:
    later = {**GOOD_ROW, "timestamp": 9, "input_length": 512, "hash_ids": [1]}
    path = _write(tmp_path, GOOD_ROW, "", later)
    assert load_trace(path) == [TraceRecord(5, 1025, 7, (1, 2, 3)), TraceRecord(9, 512, 7, (1,))]
    assert load_trace(str(path), limit=1) == [TraceRecord(5, 1025, 7, (1, 2, 3))]


@pytest.mark.parametrize(("bad", "named"), [
    ("{not json", "line 2: not valid JSON"),
    ([1, 2], "line 2: a row must be a JSON object, got list"),
    ({k: v for k, v in GOOD_ROW.items() if k != "output_length"},
     "line 2: field 'output_length' is missing"),
    ({**GOOD_ROW, "prompt": "hi"}, "line 2: field 'prompt' is not part of the format"),
    ({**GOOD_ROW, "timestamp": 5.5}, "line 2: field 'timestamp': expected an integer >= 0"),
    ({**GOOD_ROW, "timestamp": 4}, "line 2: field 'timestamp': 4 is before the previous "
     "row's 5"),
    ({**GOOD_ROW, "input_length": 0}, "line 2: field 'input_length': expected an integer >= 1"),
    ({**GOOD_ROW, "output_length": True}, "line 2: field 'output_length': expected an integer"),
    ({**GOOD_ROW, "hash_ids": [1, -2, 3]}, "line 2: field 'hash_ids': expected a list of "
     "integers >= 0"),
    ({**GOOD_ROW, "hash_ids": "123"}, "line 2: field 'hash_ids': expected a list"),
    ({**GOOD_ROW, "hash_ids": [1, 2]}, "line 2: field 'hash_ids': 2 ids, but input_length "
     "1025 needs ceil(/512) = 3"),
])
def test_bad_rows_are_named_by_file_line_and_field(tmp_path: Path, bad: object,
                                                   named: str) -> None:
    path = _write(tmp_path, GOOD_ROW, bad)
    with pytest.raises(TraceError) as caught:
        load_trace(path)
    assert f"{path} {named}" in str(caught.value)
    assert load_trace(path, limit=1) == [TraceRecord(5, 1025, 7, (1, 2, 3))]  # row 2 unread


def test_a_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "absent.jsonl")


def test_window_stops_at_the_row_count_or_the_duration() -> None:
    records = [TraceRecord(t, 1, 1, (0,)) for t in (100, 100, 1100, 2100, 4100)]
    assert [row for row, _ in trace_window(records, 0, 10, 2.0)] == [0, 1, 2, 3]
    assert [row for row, _ in trace_window(records, 0, 10, 2.0, speed=2.0)] == [0, 1, 2, 3, 4]
    assert [row for row, _ in trace_window(records, 1, 2, 99.0)] == [1, 2]
    assert trace_window(records, 4, 10, 0.5) == [(4, records[4])]
    with pytest.raises(InvalidParamsError, match="start row 5 is past the trace's 5 rows"):
        trace_window(records, 5, 1, 1.0)


def test_block_tokens_are_stable_and_inside_the_range() -> None:
    block = block_token_ids(7, 512, SMOLLM2_VOCAB, FIRST_ID)
    assert block == block_token_ids(7, 512, SMOLLM2_VOCAB, FIRST_ID)
    assert len(block) == 512 and min(block) >= FIRST_ID and max(block) < SMOLLM2_VOCAB
    assert block != block_token_ids(8, 512, SMOLLM2_VOCAB, FIRST_ID)
    assert block[:16] == block_token_ids(7, 16, SMOLLM2_VOCAB, FIRST_ID)
    # pinned: SHAKE-256 of the id as 8 little-endian bytes, u32 words, modulo the range
    word = int.from_bytes(hashlib.shake_256((7).to_bytes(8, "little")).digest(4), "little")
    assert block[0] == FIRST_ID + word % (SMOLLM2_VOCAB - FIRST_ID)
    assert set(block_token_ids(3, 64, 20, 18)) <= {18, 19}


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


@pytest.mark.parametrize("shared", [0, 1, 3])
def test_rows_sharing_k_leading_ids_share_exactly_k_blocks_of_tokens(shared: int) -> None:
    block = 26
    first = TraceRecord(0, 4 * block + 5, 1, (*range(shared), 100, 101, 102, 103, 104)[:5])
    second = TraceRecord(0, 5 * block, 1, (*range(shared), 200, 201, 202, 203, 204)[:5])
    a = synthesize_prompt(first, block, SMOLLM2_VOCAB, FIRST_ID)
    b = synthesize_prompt(second, block, SMOLLM2_VOCAB, FIRST_ID)
    assert (len(a), len(b)) == (4 * block + 5, 5 * block)
    assert _common_prefix(a, b) == shared * block
    assert a == synthesize_prompt(first, block, SMOLLM2_VOCAB, FIRST_ID)
    assert a[: 4 * block] == [t for i in first.hash_ids[:4]
                              for t in block_token_ids(i, block, SMOLLM2_VOCAB, FIRST_ID)]


def test_synthesize_refuses_what_it_cannot_build() -> None:
    record = TraceRecord(0, 513, 1, (1, 2))
    with pytest.raises(InvalidParamsError, match="2 blocks of 256 tokens cannot hold "
                       "input_length 513"):
        synthesize_prompt(record, 256, SMOLLM2_VOCAB)
    with pytest.raises(InvalidParamsError, match="block_tokens must be >= 1"):
        synthesize_prompt(record, 0, SMOLLM2_VOCAB)
    with pytest.raises(InvalidParamsError, match="first_token_id 17, vocab_size 17"):
        synthesize_prompt(record, 512, 17, 17)


def test_scaling_keeps_one_block_per_id_and_caps_the_reply() -> None:
    row = TraceRecord(0, 6758, 500, tuple(range(14)))  # 13 full blocks and 102 tokens
    scaled = scale_record(row, 0.05, 0.1, max_output_tokens=64)
    assert scaled_block_tokens(0.05) == 26
    assert scaled == TraceRecord(0, 13 * 26 + 5, 50, row.hash_ids)
    assert scale_record(row, 0.05, 0.2, max_output_tokens=64).output_length == 64
    assert scale_record(row, 0.05, 0.2).output_length == 100
    assert scale_record(row, 1.0, 1.0) == row
    tiny = scale_record(row, 0.001, 0.001)  # blocks and the reply never vanish
    assert (scaled_block_tokens(0.001), tiny.input_length, tiny.output_length) == (1, 14, 1)
    assert len(synthesize_prompt(scaled, 26, SMOLLM2_VOCAB, FIRST_ID)) == 343


def test_scaled_rows_keep_their_shared_prefix() -> None:
    records = load_trace(limit=2)  # both start with block 0, then differ
    block = scaled_block_tokens(0.05)
    a, b = (synthesize_prompt(scale_record(r, 0.05, 0.1), block, SMOLLM2_VOCAB, FIRST_ID)
            for r in records)
    assert records[0].hash_ids[0] == records[1].hash_ids[0] == 0
    assert records[0].hash_ids[1] != records[1].hash_ids[1]
    assert _common_prefix(a, b) == block


def test_scaling_refuses_bad_factors_and_mismatched_rows() -> None:
    row = TraceRecord(0, 1000, 10, (1, 2))
    with pytest.raises(InvalidParamsError, match="input scale must be > 0"):
        scale_record(row, 0.0, 1.0)
    with pytest.raises(InvalidParamsError, match="need output scale > 0"):
        scale_record(row, 1.0, -1.0)
    with pytest.raises(InvalidParamsError, match="max output tokens >= 1"):
        scale_record(row, 1.0, 1.0, max_output_tokens=0)
    with pytest.raises(InvalidParamsError, match="input_length 1000 does not match 3 blocks"):
        scale_record(TraceRecord(0, 1000, 10, (1, 2, 3)), 0.5, 1.0)
    assert scale_record(row, 0.5, 1.0, block_tokens=TRACE_BLOCK_TOKENS).input_length == 500
