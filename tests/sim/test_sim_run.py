"""Workloads from traces, profiles (named, from files, fitted), the run summary, the capacity
search, and the ``kvcake sim`` commands end to end (deterministic output, clear errors)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import pytest

from kvcake.cli import main
from kvcake.common.errors import InvalidParamsError
from kvcake.common.trace import TraceRecord, load_trace
from kvcake.sim.profile import PROFILES, Profile, fit_profile, load_profile
from kvcake.sim.report import meets_slo, print_summary, summarise
from kvcake.sim.request import Phase, SimRequest
from kvcake.sim.simulator import SimConfig, Simulator
from kvcake.sim.sweep import Probe, find_capacity, parse_layout
from kvcake.sim.workload import WorkloadSpec, block_keys, build_requests, select_rows

TOY = Profile(
    name="toy", description="round numbers", block_tokens=4, kv_bytes_per_token=100,
    prefill_fixed_s=0.0, prefill_per_token_s=0.001, prefill_attention_s=0.0,
    prefill_chunk_tokens=64, decode_fixed_s=0.01, decode_per_request_s=0.001,
    decode_per_context_token_s=0.0, network_bytes_per_s=1e6, cache_blocks=1000,
    decode_kv_tokens=1000, max_batch=4)


def assert_invalid(message: str, call: Any, *args: Any, **kwargs: Any) -> None:
    with pytest.raises(InvalidParamsError) as caught:
        call(*args, **kwargs)
    assert str(caught.value) == f"INVALID_PARAMS: {message}"


# ----- workload: block keys
ROW = TraceRecord(0, 1024 + 102, 10, (7, 9, 4))  # two full trace blocks and a 102-token tail


@pytest.mark.parametrize(("block_tokens", "keys"), [
    (256, ("7.0", "7.1", "9.2", "9.3")),  # each trace block splits in two
    (512, ("7.0", "9.1")),  # one to one; the tail (id 4) is partial: no key
    (1024, ("9.0",)),  # one block spans both ids: named by the one holding its last token
    (100, ("7.0", "7.1", "7.2", "7.3", "7.4", "9.5", "9.6", "9.7", "9.8", "9.9", "4.10")),
])
def test_block_keys_map_trace_blocks_onto_instance_blocks(block_tokens: int,
                                                          keys: tuple[str, ...]) -> None:
    assert block_keys(ROW, 512, block_tokens) == keys
    assert len(keys) == ROW.input_length // block_tokens


def test_rows_sharing_leading_ids_share_exactly_the_keys_those_ids_cover() -> None:
    a = TraceRecord(0, 1536, 1, (1, 2, 3))
    b = TraceRecord(0, 1536 + 100, 1, (1, 2, 5, 6))
    c = TraceRecord(0, 1536, 1, (1, 8, 9))  # shares id 1 only: half of a 1024-token block
    for block_tokens, shared_ab, shared_ac in ((256, 4, 2), (512, 2, 1), (1024, 1, 0)):
        ka, kb, kc = (block_keys(r, 512, block_tokens) for r in (a, b, c))
        assert _common_prefix(ka, kb) == shared_ab
        assert set(ka) & set(kb) == set(ka[:shared_ab])  # nothing shared past the prefix
        assert _common_prefix(ka, kc) == shared_ac
        assert set(ka) & set(kc) == set(ka[:shared_ac])
    assert block_keys(b, 512, 256) == ("1.0", "1.1", "2.2", "2.3", "5.4", "5.5")


def _common_prefix(x: tuple[str, ...], y: tuple[str, ...]) -> int:
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n


def test_block_keys_refuse_empty_blocks() -> None:
    assert_invalid("block sizes must be >= 1, got 0 and 4", block_keys, ROW, 0, 4)
    assert_invalid("block sizes must be >= 1, got 512 and 0", block_keys, ROW, 512, 0)


# ----- workload: rows and requests
RECORDS = [TraceRecord(1000 + 500 * n, 600 + n, n % 3, (n, 100 + n)) for n in range(10)]


def test_select_rows_by_start_and_limit() -> None:
    assert select_rows(RECORDS, WorkloadSpec()) == list(range(10))
    assert select_rows(RECORDS, WorkloadSpec(start_row=3, limit=4)) == [3, 4, 5, 6]
    assert select_rows(RECORDS, WorkloadSpec(start_row=8, limit=5)) == [8, 9]  # to the end
    assert select_rows(RECORDS, WorkloadSpec(start_row=9)) == [9]
    assert_invalid("start row 10 is past the trace's 10 rows", select_rows, RECORDS,
                   WorkloadSpec(start_row=10))


def test_sampling_is_seeded_and_keeps_rows_in_order() -> None:
    records = [TraceRecord(n, 1, 1, (n,)) for n in range(1000)]
    spec = WorkloadSpec(start_row=100, limit=500, sample=0.3, seed=11)
    rows = select_rows(records, spec)
    assert rows == select_rows(records, spec)  # the same seed, the same rows
    assert rows != select_rows(records, replace(spec, seed=12))
    assert rows == sorted(set(rows))
    assert rows[0] >= 100 and rows[-1] < 600
    assert 100 < len(rows) < 200  # about 30 % of 500
    assert select_rows(records, replace(spec, sample=1.0)) == list(range(100, 600))


def test_build_requests_times_ids_and_lengths() -> None:
    requests = build_requests(RECORDS, WorkloadSpec(start_row=2, limit=3, speed=2.0), 256)
    assert [r.request_id for r in requests] == ["r2", "r3", "r4"]
    assert [r.row for r in requests] == [2, 3, 4]
    # arrivals from the first selected row's time, twice as fast: 500 ms apart -> 0.25 s
    assert [r.arrival_s for r in requests] == [0.0, 0.25, 0.5]
    assert [r.num_prompt_tokens for r in requests] == [602, 603, 604]
    assert [r.num_output_tokens for r in requests] == [2, 1, 1]  # output 0 becomes 1
    assert requests[0].block_keys == ("2.0", "2.1")  # both halves of trace block 0
    assert {r.block_tokens for r in requests} == {256}
    assert {r.phase for r in requests} == {Phase.ARRIVED}
    fixed = build_requests(RECORDS, WorkloadSpec(limit=2, output_tokens=7), 256)
    assert [r.num_output_tokens for r in fixed] == [7, 7]


def test_scaled_rows_keep_their_blocks() -> None:
    spec = WorkloadSpec(input_scale=0.5, output_scale=0.5, max_output_tokens=4)
    (request,) = build_requests([ROW], spec, 256)
    # trace blocks of 256 now: 2 x 256 + round(102 / 2) = 563 tokens, output 10 / 2 -> cap 4
    assert (request.num_prompt_tokens, request.num_output_tokens) == (563, 4)
    assert request.block_keys == ("7.0", "9.1")


def test_a_sample_that_keeps_nothing_is_refused() -> None:
    assert_invalid("the sample kept no row; raise --sample or --limit", build_requests,
                   RECORDS, WorkloadSpec(limit=2, sample=1e-9), 16)


@pytest.mark.parametrize(("fields", "message"), [
    ({"speed": 0.0}, "speed must be > 0, got 0.0"),
    ({"speed": -2.0}, "speed must be > 0, got -2.0"),
    ({"start_row": -1}, "start row must be >= 0, got -1"),
    ({"limit": 0}, "limit must be >= 1, got 0"),
    ({"sample": 0.0}, "sample must be in (0, 1], got 0.0"),
    ({"sample": 1.5}, "sample must be in (0, 1], got 1.5"),
    ({"output_tokens": 0}, "output tokens must be >= 1, got 0"),
])
def test_workload_spec_names_what_is_wrong(fields: dict[str, Any], message: str) -> None:
    assert_invalid(message, WorkloadSpec, **fields)


# ----- profiles
def test_profiles_by_name() -> None:
    assert PROFILES
    for name, profile in PROFILES.items():
        assert load_profile(name) is profile
        assert profile.name == name
    llama = load_profile("llama2-70b-a800")
    assert (llama.block_tokens, llama.kv_bytes_per_token) == (512, 327_680)
    assert load_profile("smollm2-cpu").block_tokens == 16


def test_unknown_profile_names_the_known_ones() -> None:
    known = ", ".join(sorted(PROFILES))
    assert_invalid(f"unknown profile 'nope': not one of {known} and not a file",
                   load_profile, "nope")


def test_a_profile_from_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(TOY.to_json()), encoding="utf-8")
    assert load_profile(str(path)) == TOY
    assert TOY.to_json() == asdict(TOY)
    assert [f.name for f in fields(Profile)] == list(TOY.to_json())


@pytest.mark.parametrize(("change", "message"), [
    ({"max_batch": None}, "field 'max_batch' is missing"),
    ({"name": None}, "field 'name' is missing"),
    ({"colour": "red"}, "field 'colour' is not a profile field"),
    ({"block_tokens": "16"}, "field 'block_tokens' must be int, got '16'"),
    ({"block_tokens": 16.0}, "field 'block_tokens' must be int, got 16.0"),
    ({"max_batch": True}, "field 'max_batch' must be int, got True"),
    ({"prefill_per_token_s": "fast"}, "field 'prefill_per_token_s' must be float, got 'fast'"),
    ({"description": 3}, "field 'description' must be str, got 3"),
])
def test_a_bad_profile_file_names_the_field(tmp_path: Path, change: dict[str, Any],
                                            message: str) -> None:
    data = TOY.to_json()
    for key, value in change.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert_invalid(f"{path}: {message}", load_profile, str(path))


def test_profile_files_that_are_not_profiles(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    assert_invalid(f"profile file {broken}: not valid JSON (Expecting property name enclosed "
                   f"in double quotes)", load_profile, str(broken))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]", encoding="utf-8")
    assert_invalid(f"{listed}: a profile must be a JSON object", load_profile, str(listed))
    negative = tmp_path / "negative.json"
    negative.write_text(json.dumps({**TOY.to_json(), "cache_blocks": -1}), encoding="utf-8")
    assert_invalid("profile 'toy': cache_blocks must be finite and >= 0, got -1", load_profile,
                   str(negative))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**TOY.to_json(), "block_tokens": 0}), encoding="utf-8")
    assert_invalid("profile 'toy': block_tokens must be > 0, got 0", load_profile, str(empty))


def test_profile_prices_work_with_the_conductors_formulas() -> None:
    profile = replace(TOY, prefill_fixed_s=0.002, prefill_attention_s=1e-5,
                      decode_per_context_token_s=1e-6)
    cost = profile.cost_model()
    assert cost.prefill_s(10, 30) == pytest.approx(0.002 + 0.010 + 1e-5 * (50 + 300))
    assert cost.decode_step_s(3, 1000) == pytest.approx(0.01 + 0.003 + 0.001)
    assert cost.transfer_s(2000) == pytest.approx(0.002)
    assert profile.kv_seconds(20) == pytest.approx(0.002)


# ----- profiles fitted to `kvcake bench engine --json`
PER_TOKEN, STEP_FIXED, STEP_PER_REQUEST = 5e-4, 0.03, 0.002
PROMPT_LEN, NEW_TOKENS = 512, 33


def bench_rows(per_token: float = PER_TOKEN) -> list[dict[str, Any]]:
    """Rows shaped as `kvcake bench engine --json` writes them, made from known
    coefficients: a prefill row is ``batch`` prompts in ceil(tokens / chunk) steps; a decode
    row is ``new_tokens - 1`` steps of ``fixed + per_request * batch``."""
    base = load_profile("smollm2-cpu")
    rows: list[dict[str, Any]] = []
    for batch in (1, 8, 32):
        tokens = batch * PROMPT_LEN
        steps = math.ceil(tokens / base.prefill_chunk_tokens)
        common = {"system": "kvcake", "batch": batch, "prompt_len": PROMPT_LEN,
                  "new_tokens": NEW_TOKENS, "dtype": "bfloat16", "threads": 2, "repeats": 3}
        prefill_s = steps * base.prefill_fixed_s + tokens * per_token
        decode_s = (NEW_TOKENS - 1) * (STEP_FIXED + STEP_PER_REQUEST * batch)
        rows.append({**common, "phase": "prefill", "seconds": prefill_s,
                     "tok_per_s": tokens / prefill_s})
        rows.append({**common, "phase": "decode", "seconds": decode_s,
                     "tok_per_s": batch * (NEW_TOKENS - 1) / decode_s})
        rows.append({**common, "system": "hf", "phase": "decode", "seconds": 99.0,
                     "tok_per_s": 1.0})  # a baseline: ignored
    rows.append({"ratio": "kvcake/hf", "phase": "decode", "batch": 1, "value": 3.0})
    return rows


def test_fit_profile_recovers_the_coefficients() -> None:
    base = load_profile("smollm2-cpu")
    fitted = fit_profile(bench_rows(), base, name="mine")
    assert fitted.prefill_per_token_s == pytest.approx(PER_TOKEN)
    assert fitted.decode_fixed_s == pytest.approx(STEP_FIXED)
    assert fitted.decode_per_request_s == pytest.approx(STEP_PER_REQUEST)
    assert (fitted.name, fitted.description) == ("mine", "fitted from kvcake bench engine "
                                                 "(smollm2-cpu)")
    # everything one prompt length cannot pin stays the base's
    assert replace(fitted, name=base.name, description=base.description,
                   prefill_per_token_s=base.prefill_per_token_s,
                   decode_fixed_s=base.decode_fixed_s,
                   decode_per_request_s=base.decode_per_request_s) == base


def test_fit_profile_takes_the_median_prefill_rate_and_clamps_at_zero() -> None:
    rows = bench_rows()
    outlier = bench_rows(per_token=9e-4)[0]  # batch 1 measured slower
    fitted = fit_profile([outlier, *rows[1:]], load_profile("smollm2-cpu"))
    assert fitted.prefill_per_token_s == pytest.approx(PER_TOKEN)  # median of 3
    steep = [{"system": "kvcake", "phase": "decode", "batch": b, "new_tokens": 11,
              "seconds": 10 * s} for b, s in ((1, 0.001), (2, 0.003))]  # line: -0.001 + 0.002 b
    fitted = fit_profile([rows[0], *steep], load_profile("smollm2-cpu"))
    assert fitted.decode_fixed_s == 0.0
    assert fitted.decode_per_request_s == pytest.approx(0.002)


@pytest.mark.parametrize("keep", ["no prefill", "one decode batch", "nothing"])
def test_fit_profile_needs_prefill_and_two_decode_batches(keep: str) -> None:
    rows = [r for r in bench_rows() if r.get("system") == "kvcake"]
    if keep == "no prefill":
        rows = [r for r in rows if r["phase"] == "decode"]
    elif keep == "one decode batch":
        rows = [r for r in rows if r["phase"] == "prefill" or r["batch"] == 8]
    else:
        rows = []
    assert_invalid("need kvcake prefill rows and decode rows of at least two batch sizes "
                   "(kvcake bench engine --json)", fit_profile, rows)


# ----- the summary
def toy_req(rid: str, arrival_s: float, prompt: int, output: int = 1,
            shared: tuple[str, ...] = ()) -> SimRequest:
    keys = (*shared, *(f"{rid}.{j}" for j in range(len(shared), prompt // 4)))
    return SimRequest(request_id=rid, row=0, arrival_s=arrival_s, num_prompt_tokens=prompt,
                      num_output_tokens=output, block_keys=keys, block_tokens=4)


SUMMARY_KEYS = {
    "profile", "policy", "admission", "num_prefill", "num_decode", "num_colocated",
    "pool_capacity_blocks", "num_requests", "num_completed", "num_rejected", "rejections",
    "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tbt_mean_s", "tbt_p50_s",
    "tbt_p90_s", "tbt_p99_s", "slo_ttft_s", "slo_tbt_s", "slo_attainment",
    "slo_attainment_by_tbt", "arrival_rate_rps", "goodput_rps", "hit_ratio_blocks",
    "hit_ratio_tokens", "local_hit_ratio_blocks", "remote_hit_ratio_blocks",
    "prefill_compute_saved", "duration_s"}


def test_summary_of_a_warm_prefix_by_hand() -> None:
    doc = tuple(f"P.{j}" for j in range(10))
    r1, r2 = toy_req("r1", 0.0, 40, shared=doc), toy_req("r2", 1.0, 48, shared=doc)
    config = SimConfig(TOY, num_prefill=2, num_decode=1, policy="cache_aware")
    summary = summarise(config, Simulator(config, [r1, r2]).run())
    assert set(summary) == SUMMARY_KEYS
    assert summary == {
        "profile": "toy", "policy": "cache_aware", "admission": "none", "num_prefill": 2,
        "num_decode": 1, "num_colocated": 0, "pool_capacity_blocks": None,
        "num_requests": 2, "num_completed": 2, "num_rejected": 0, "rejections": {},
        # TTFTs 40 ms (cold) and 8 ms (10 of its 12 blocks local); nearest-rank percentiles
        "ttft_mean_s": pytest.approx(0.024), "ttft_p50_s": pytest.approx(0.008),
        "ttft_p90_s": pytest.approx(0.040), "ttft_p99_s": pytest.approx(0.040),
        "tbt_mean_s": None, "tbt_p50_s": None, "tbt_p90_s": None, "tbt_p99_s": None,
        "slo_ttft_s": 30.0, "slo_tbt_s": 0.1, "slo_attainment": 1.0,
        "slo_attainment_by_tbt": {"0.1": 1.0, "0.2": 1.0, "0.3": 1.0},
        "arrival_rate_rps": 2.0, "goodput_rps": 2.0,
        "hit_ratio_blocks": pytest.approx(10 / 22), "hit_ratio_tokens": pytest.approx(40 / 88),
        "local_hit_ratio_blocks": pytest.approx(10 / 22), "remote_hit_ratio_blocks": 0.0,
        "prefill_compute_saved": pytest.approx(1 - 0.048 / 0.088),
        "duration_s": pytest.approx(1.008)}
    json.dumps(summary)  # JSON-ready


def test_summary_counts_rejections_against_attainment() -> None:
    # big's predicted TTFT (2 s) breaks a 1 s objective: rejected at routing
    a = toy_req("a", 0.0, 6, output=3)
    big = toy_req("big", 0.5, 2000)
    c = toy_req("c", 1.0, 6, output=12)
    config = SimConfig(TOY, num_prefill=1, num_decode=1, admission="ttft", slo_ttft_s=1.0,
                       slo_tbt_s=0.015)
    summary = summarise(config, Simulator(config, [a, big, c]).run())
    assert (big.phase, big.rejected_reason) == (Phase.REJECTED, "ttft_slo")
    assert (summary["num_requests"], summary["num_completed"], summary["num_rejected"]) == \
        (3, 2, 1)
    assert summary["rejections"] == {"ttft_slo": 1}
    # a: first gap 0.6 ms of KV + 11 ms, then 11 ms -> TBT 11.6 ms; c: 11 gaps, the slowest
    # two are the first (11.6 ms) and an 11 ms step -> 11.3 ms
    assert [a.tbt_s, c.tbt_s] == pytest.approx([0.0116, 0.0113])
    assert summary["tbt_p90_s"] == pytest.approx(0.0116)
    assert summary["tbt_mean_s"] == pytest.approx((0.0116 + 0.0113) / 2)
    assert summary["slo_attainment"] == pytest.approx(2 / 3)
    assert summary["slo_attainment_by_tbt"] == {"0.1": pytest.approx(2 / 3),
                                                "0.2": pytest.approx(2 / 3),
                                                "0.3": pytest.approx(2 / 3)}
    # the rejected prompt never prefilled: hit ratios count the other two only
    assert (summary["hit_ratio_blocks"], summary["hit_ratio_tokens"]) == (0.0, 0.0)
    assert summary["goodput_rps"] == pytest.approx(2.0)  # 2 met over 1 s of arrivals


def test_the_summary_prints_as_a_table() -> None:
    import io

    config = SimConfig(TOY, num_prefill=1, num_decode=1, pool_capacity_blocks=0)
    summary = summarise(config, Simulator(config, [toy_req("a", 0.0, 6, output=3)]).run())
    out = io.StringIO()
    print_summary(summary, out)
    lines = out.getvalue().splitlines()
    assert lines[0] == ("toy: 1 prefill + 1 decode, policy kvcache_centric, admission none, "
                        "pool unbounded blocks")
    assert lines[1] == "requests 1: completed 1, rejected 0"
    assert lines[2] == " TTFT s: mean 0.006  p50 0.006  p90 0.006  p99 0.006"
    assert len(lines) == 6  # a single arrival has no rate line


def finished(ttft_s: float | None, tbt_s: float | None,
             phase: Phase = Phase.FINISHED) -> SimRequest:
    request = toy_req("r", 10.0, 8)
    request.phase = phase
    request.first_token_s = None if ttft_s is None else 10.0 + ttft_s
    request.tbt_s = tbt_s
    return request


@pytest.mark.parametrize(("request_", "meets"), [
    (finished(1.0, 0.05), True),  # both at the objective: met
    (finished(1.5, 0.05), False),
    (finished(1.0, 0.06), False),
    (finished(0.5, None), True),  # one token: no TBT to break
    (finished(None, None), False),
    (finished(0.5, 0.01, Phase.REJECTED), False),  # rejected at decode after its prefill
    (finished(0.5, None, Phase.DECODING), False),  # not finished
])
def test_meets_slo(request_: SimRequest, meets: bool) -> None:
    assert meets_slo(request_, slo_ttft_s=1.0, slo_tbt_s=0.05) is meets


# ----- the capacity search
@pytest.mark.parametrize(("text", "counts"), [
    ("8P+8D", (8, 8, 0)), ("16C", (0, 0, 16)), ("12p + 4d", (12, 4, 0)),
    ("2P+1D+1C", (2, 1, 1)), ("1P+1P+2D", (2, 2, 0)), ("0P+0D", (0, 0, 0)),
])
def test_parse_layout(text: str, counts: tuple[int, int, int]) -> None:
    assert parse_layout(text) == counts


@pytest.mark.parametrize("text", ["", "8", "P", "8X", "8P+", "+8D", "-1P+1D", "8P8D", "1.5C",
                                  "8P,8D"])
def test_parse_layout_refuses_what_is_not_a_layout(text: str) -> None:
    assert_invalid(f"layout {text!r}: write parts like 8P+8D or 16C", parse_layout, text)


def test_parse_layout_refuses_digits_int_cannot_read() -> None:
    text = "\u00b2P+1D"  # a superscript two: str.isdigit() says yes, int() says no
    assert_invalid(f"layout {text!r}: write parts like 8P+8D or 16C", parse_layout, text)


LLAMA = "llama2-70b-a800"


def test_find_capacity_brackets_and_bisects_to_the_fastest_speed_meeting_the_target() -> None:
    records = load_trace(limit=150)
    config = SimConfig(load_profile(LLAMA), num_prefill=2, num_decode=2)
    seen: list[Probe] = []
    capacity = find_capacity(records, config, WorkloadSpec(limit=150), 0.9,
                             on_probe=seen.append)
    assert capacity.label == "2P+2D kvcache_centric"
    assert capacity.target == 0.9
    speeds = [p.speed for p in capacity.probes]
    assert speeds == sorted(speeds) and len(set(speeds)) == len(speeds) == len(seen)
    assert sorted(seen, key=lambda p: p.speed) == list(capacity.probes)
    best = capacity.best
    assert best is not None and best.slo_attainment >= 0.9
    assert all(p.slo_attainment < 0.9 for p in capacity.probes if p.speed > best.speed)
    faster = next(p for p in capacity.probes if p.speed > best.speed)
    assert faster.slo_attainment < 0.9
    assert faster.speed / best.speed == pytest.approx(2 ** (1 / 2 ** 6))  # 6 bisections
    # the rate scales with the speed (the same rows, sped up)
    assert {round(p.arrival_rate_rps / p.speed, 9) for p in capacity.probes} == \
        {round(capacity.probes[0].arrival_rate_rps / capacity.probes[0].speed, 9)}
    again = find_capacity(records, config, WorkloadSpec(limit=150), 0.9)
    assert again == capacity


def test_find_capacity_at_the_ends_of_the_speed_range() -> None:
    records = load_trace(limit=20)
    profile = load_profile(LLAMA)
    easy = SimConfig(profile, num_prefill=1, num_decode=1, slo_ttft_s=1e6, slo_tbt_s=1e6)
    capacity = find_capacity(records, easy, WorkloadSpec(limit=20), 0.9)
    assert [p.speed for p in capacity.probes] == [1, 2, 4, 8, 16, 32, 64]
    assert capacity.best is not None and capacity.best.speed == 64
    hopeless = SimConfig(profile, num_prefill=1, num_decode=1, slo_ttft_s=1e-9)
    capacity = find_capacity(records, hopeless, WorkloadSpec(limit=20), 0.9)
    assert [p.speed for p in capacity.probes] == [1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1]
    assert capacity.best is None


@pytest.mark.parametrize("target", [0.0, 1.5, -0.1])
def test_find_capacity_refuses_a_bad_target(target: float) -> None:
    config = SimConfig(load_profile(LLAMA), num_prefill=1, num_decode=1)
    assert_invalid(f"target attainment must be in (0, 1], got {target}", find_capacity,
                   load_trace(limit=5), config, WorkloadSpec(), target)


# ----- the commands
def kvcake(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["sim", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def subprocess_sim(*argv: str, hash_seed: str) -> bytes:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    result = subprocess.run([sys.executable, "-m", "kvcake.cli", "sim", *argv],
                            capture_output=True, timeout=120, check=True, env=env)
    return result.stdout


@pytest.mark.parametrize("argv", [("--limit", "300", "--json"),
                                  ("--limit", "300", "--json", "--policy", "random", "--seed",
                                   "5", "--prefill", "4", "--decode", "4")])
def test_the_command_is_byte_for_byte_deterministic(argv: tuple[str, ...]) -> None:
    """Two processes with different hash seeds print the same bytes."""
    first = subprocess_sim(*argv, hash_seed="1")
    assert first == subprocess_sim(*argv, hash_seed="2")
    summary = json.loads(first)
    assert set(summary) == SUMMARY_KEYS
    assert summary["num_requests"] == 300
    assert summary["policy"] == ("random" if "random" in argv else "kvcache_centric")


def test_the_command_in_process_matches_and_seeds_matter(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    argv = ("--limit", "200", "--json", "--policy", "random", "--prefill", "3", "--decode", "2")
    runs = [kvcake(capsys, *argv, "--seed", seed) for seed in ("5", "5", "6")]
    assert [code for code, _, _ in runs] == [0, 0, 0]
    assert runs[0][1] == runs[1][1]
    assert runs[0][1] != runs[2][1]
    assert runs[0][2] == ""


def test_the_command_prints_a_table_and_plots(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    plot = tmp_path / "cdf.png"
    code, out, err = kvcake(capsys, "--limit", "50", "--prefill", "2", "--decode", "2",
                            "--plot", str(plot))
    assert (code, err) == (0, "")
    assert out.startswith("llama2-70b-a800: 2 prefill + 2 decode, policy kvcache_centric, "
                          "admission none, no pool tier\nrequests 50: completed 50")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_conversations_are_replayed_with_the_prefixes_their_turns_share(
        capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("--workload", "conversations", "--sessions", "12", "--turns", "3", "--prefill",
            "2", "--decode", "2", "--json")
    code, out, _ = kvcake(capsys, *argv)
    summary = json.loads(out)
    assert (code, summary["num_requests"]) == (0, 36)
    assert summary["hit_ratio_tokens"] > 0.5  # each turn holds the last one's prompt
    code, cold, _ = kvcake(capsys, *argv[:-1], "--policy", "random", "--json")
    assert json.loads(cold)["hit_ratio_tokens"] < summary["hit_ratio_tokens"]


def test_a_colocated_cluster_from_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = kvcake(capsys, "--prefill", "0", "--decode", "0", "--colocated", "2",
                          "--limit", "30", "--json")
    summary = json.loads(out)
    assert code == 0
    assert (summary["num_prefill"], summary["num_decode"], summary["num_colocated"]) == (0, 0, 2)


@pytest.mark.parametrize(("argv", "message"), [
    (("--profile", "nope"), "unknown profile 'nope': not one of {known} and not a file"),
    (("--prefill", "0", "--decode", "0"),
     "a cluster needs prefill >= 1 and decode >= 1, or colocated >= 1 alone"),
    (("--prefill", "-1"), "instance counts must be >= 0, got prefill -1, decode 8, colocated 0"),
    (("--policy", "fastest"), "policy must be one of cache_aware, kvcache_centric, "
                              "least_loaded, random, round_robin; got 'fastest'"),
    (("--speed", "0"), "speed must be > 0, got 0.0"),
    (("sweep", "--layouts", "8X+8D"), "layout '8X+8D': write parts like 8P+8D or 16C"),
    (("sweep", "--layouts", "0P+0D"),
     "a cluster needs prefill >= 1 and decode >= 1, or colocated >= 1 alone"),
    (("sweep", "--target", "2"), "target attainment must be in (0, 1], got 2.0"),
    (("--pool-capacity", "-5"), "pool capacity must be >= 0 blocks, got -5"),
    (("--eviction", "mru"), "unknown eviction policy 'mru'; known: fifo, lru"),
    (("--admission", "x"), "admission must be one of early, none, predictive, ttft; got 'x'"),
    (("--threshold", "0.5"), "balancing_threshold must be >= 1, got 0.5"),
    (("--input-scale", "0"), "input scale must be > 0, got 0.0"),
    (("--start-row", "999999"), "start row 999999 is past the trace's 12031 rows"),
    (("profile", "--base", "nope"), "unknown profile 'nope': not one of {known} and not a file"),
    (("--workload", "conversations", "--trace", "x.jsonl"),
     "--trace names rows of a trace; the conversations workload makes its own"),
    (("--workload", "conversations", "--sessions", "0"),
     "conversations: sessions must be >= 1, got 0"),
])
def test_the_command_refuses_bad_input_clearly(capsys: pytest.CaptureFixture[str],
                                               argv: tuple[str, ...], message: str) -> None:
    code, out, err = kvcake(capsys, *argv, *(("--limit", "5") if argv[0] != "profile" else ()))
    known = ", ".join(sorted(PROFILES))
    assert (code, out) == (2, "")
    assert err == f"kvcake: error: INVALID_PARAMS: {message.format(known=known)}\n"


@pytest.mark.parametrize("argv", [("--pool-capacity", "lots", "--limit", "5"),
                                  ("--trace", "/nonexistent/trace.jsonl"),
                                  ("sweep", "--trace", "/nonexistent/trace.jsonl"),
                                  ("profile", "--bench", "/nonexistent/bench.jsonl")],
                         ids=["pool-capacity", "sim-trace", "sweep-trace", "profile-bench"])
def test_the_command_refuses_unreadable_input_clearly(capsys: pytest.CaptureFixture[str],
                                                      argv: tuple[str, ...]) -> None:
    code, out, err = kvcake(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith("kvcake: error: ")


def test_the_sweep_command_prints_json_and_a_plot(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    plot = tmp_path / "capacity.png"
    code, out, err = kvcake(capsys, "sweep", "--limit", "200", "--json", "--plot", str(plot))
    assert (code, err) == (0, "")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["config"] for line in lines] == ["8P+8D kvcache_centric", "16C kvcache_centric"]
    for line in lines:
        assert set(line) == {"config", "target", "capacity_speed", "capacity_rps", "probes"}
        assert line["target"] == 0.9
        met = [p for p in line["probes"] if p["slo_attainment"] >= 0.9]
        assert met, line
        best = max(met, key=lambda p: p["speed"])
        assert (line["capacity_speed"], line["capacity_rps"]) == \
            (best["speed"], best["arrival_rate_rps"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_profile_command_round_trips_through_a_file(capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path) -> None:
    code, out, _ = kvcake(capsys, "profile")
    assert code == 0
    path = tmp_path / "profile.json"
    path.write_text(out, encoding="utf-8")
    assert load_profile(str(path)) == load_profile("smollm2-cpu")
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(row) + "\n" for row in bench_rows()), encoding="utf-8")
    code, out, _ = kvcake(capsys, "profile", "--bench", str(bench), "--name", "here",
                          "--base", LLAMA)
    assert code == 0
    path.write_text(out, encoding="utf-8")
    fitted = load_profile(str(path))
    assert fitted == fit_profile(bench_rows(), load_profile(LLAMA), "here")
    assert fitted.name == "here" and fitted.block_tokens == 512
