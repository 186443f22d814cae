"""Replay workloads with prefix reuse: multi-turn conversations
(``kvcake.common.conversations``), the reuse measure and the most-reused trace window
(``kvcake.common.trace``), and how ``kvcake bench serve`` picks among them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvcake.bench.serve import ServeBenchOptions, build_items, workload_window
from kvcake.bench.serve_report import Slo, describe_window
from kvcake.common.conversations import ConversationSpec, conversation_records
from kvcake.common.errors import InvalidParamsError
from kvcake.common.trace import (
    TRACE_BLOCK_TOKENS,
    TraceRecord,
    load_trace,
    most_reused_start,
    prefix_reuse,
    scale_record,
    synthesize_prompt,
    trace_window,
)


def _sessions(records: list[TraceRecord]) -> list[list[TraceRecord]]:
    """Records grouped by session: a turn extends the one before it."""
    sessions: list[list[TraceRecord]] = []
    for record in records:
        for turns in sessions:
            last = turns[-1].hash_ids
            if record.hash_ids[:len(last)] == last:
                turns.append(record)
                break
        else:
            sessions.append([record])
    return sessions


def test_each_turn_extends_the_last_by_its_reply_and_a_message() -> None:
    spec = ConversationSpec(sessions=5, turns=3, system_prompts=2, system_blocks=4,
                            message_blocks=2, reply_blocks=1)
    records = conversation_records(spec)
    sessions = _sessions(records)
    assert len(records) == 15 and sorted(len(turns) for turns in sessions) == [3] * 5
    for turns in sessions:
        assert [len(t.hash_ids) for t in turns] == [6, 9, 12]
        assert all(t.input_length == len(t.hash_ids) * TRACE_BLOCK_TOKENS for t in turns)
        times = [t.timestamp_ms for t in turns]
        assert times == sorted(times)
    openers = {turns[0].hash_ids[:4] for turns in sessions}
    assert len(openers) == 2  # two system prompts, shared by the five sessions
    fresh = [i for turns in sessions for i in turns[-1].hash_ids[4:]]
    assert len(fresh) == len(set(fresh))  # messages and replies belong to one session


def test_records_arrive_in_order_within_the_spans_and_repeat_by_seed() -> None:
    spec = ConversationSpec(sessions=6, turns=4, open_s=10.0, think_s=5.0, output_tokens=100)
    records = conversation_records(spec)
    assert [r.timestamp_ms for r in records] == sorted(r.timestamp_ms for r in records)
    assert records[-1].timestamp_ms <= (10.0 + 3 * 1.5 * 5.0) * 1000
    assert all(50 <= r.output_length <= 150 for r in records)
    assert conversation_records(spec) == records
    assert conversation_records(ConversationSpec(sessions=6, turns=4, open_s=10.0,
                                                 think_s=5.0, output_tokens=100,
                                                 seed=1)) != records


def test_conversations_reuse_most_of_their_prompts() -> None:
    spec = ConversationSpec(sessions=8, turns=5, system_prompts=2, system_blocks=4,
                            message_blocks=2, reply_blocks=1)
    records = conversation_records(spec)
    # per session: 6+9+12+15+18 = 60 blocks, of which the later turns' 6+9+12+15 = 42 and
    # the system prompt of all but the first session of each prompt are reused
    assert prefix_reuse(records) == (8 * 42 + 6 * 4) / (8 * 60)
    prompts = [synthesize_prompt(scale_record(r, 0.25, 1.0), 128, 49152, 17)
               for r in records[:3]]
    assert all(len(p) == r.input_length // 4 for p, r in zip(prompts, records, strict=False))


@pytest.mark.parametrize(("field", "value"), [("sessions", 0), ("turns", 0),
                                               ("system_blocks", -1), ("think_s", -1.0)])
def test_a_bad_spec_is_named(field: str, value: float) -> None:
    with pytest.raises(InvalidParamsError, match=re.escape(field)):
        ConversationSpec(**{field: value})  # type: ignore[arg-type]


def test_reuse_counts_leading_blocks_an_earlier_record_had() -> None:
    rows = [TraceRecord(0, 1536, 1, (1, 2, 3)), TraceRecord(1, 1536, 1, (1, 2, 4)),
            TraceRecord(2, 1024, 1, (5, 2)), TraceRecord(3, 1024, 1, (1, 9))]
    # row 1 reuses 1 2; row 2 nothing (its 2 follows another block); row 3 reuses 1
    assert prefix_reuse(rows) == 3 / 10
    assert prefix_reuse([]) == 0.0


def test_the_packaged_trace_reuses_a_third_and_its_windows_far_less() -> None:
    records = load_trace()
    assert round(prefix_reuse(records), 3) == 0.366  # Mooncake's paper: 36 % for this trace
    first = trace_window(records, 0, 30, 20.0, 0.5)
    best = most_reused_start(records, 30, 20.0, 0.5)
    assert best % 10 == 0
    chosen = trace_window(records, best, 30, 20.0, 0.5)
    assert prefix_reuse(r for _, r in chosen) > 2 * prefix_reuse(r for _, r in first)


def test_the_most_reused_start_is_the_earliest_of_equals() -> None:
    rows = [TraceRecord(t, 512, 1, (t,)) for t in range(6)] + [
        TraceRecord(6, 512, 1, (0,)), TraceRecord(7, 512, 1, (0,))]
    assert most_reused_start(rows, 3, 100.0, stride=1) == 5  # rows 5..7: row 7 reuses row 6's block
    assert most_reused_start([TraceRecord(0, 512, 1, (1,))] * 4, 2, 100.0, stride=2) == 0
    with pytest.raises(InvalidParamsError, match="stride"):
        most_reused_start(rows, 3, 100.0, stride=0)


def test_bench_defaults_to_conversations_and_a_given_trace_to_its_rows(
        tmp_path: Path) -> None:
    options = ServeBenchOptions(endpoint="http://h:1", quick=True)
    assert (options.workload_name, options.prompt_scale) == ("conversations", 0.03)
    window = workload_window(options)
    assert len(window) == 30 and prefix_reuse(r for _, r in window) > 0.5
    items = build_items(options, window)
    assert items[-1].scheduled_s <= options.window_duration_s
    line = describe_window(items, options.speed, 15, Slo(5.0, 0.2), "conversations",
                           prefix_reuse(r for _, r in window))
    assert line.startswith("conversation turns 0..29: 30 requests") and "% of its blocks " \
        "reused" in line
    vllm = ServeBenchOptions(compare=True, quick=True, engine="vllm")
    assert vllm.prompt_scale == 0.125  # two trace blocks, one 128-token vLLM block
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, '
                     '"hash_ids": [3]}\n')
    assert ServeBenchOptions(endpoint="http://h:1", trace=str(trace)).workload_name == "trace"
    with pytest.raises(InvalidParamsError, match="--workload conversations makes up"):
        ServeBenchOptions(endpoint="http://h:1", trace=str(trace), workload="conversations")
    with pytest.raises(InvalidParamsError, match="--workload must be one of"):
        ServeBenchOptions(endpoint="http://h:1", workload="agents")
