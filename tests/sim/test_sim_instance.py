"""Simulated instances in steps, with a toy profile whose every time is checked by hand.

The toy profile (``TOY``) in round numbers::

    prefill_s(new, cached) = 1 ms per new token (no fixed cost, no attention)
    decode_step_s(batch)   = 10 ms + 1 ms per request in the batch
    kv_seconds(tokens)     = 1 ms per token (1000 B per token at 1 MB/s)
    blocks of 4 tokens; a step holds 8 tokens (decodes plus prefill chunks)

A disaggregated request's timeline: prefill on ``prefill-00``, first token at the end of its
last chunk; its KV reaches ``decode-00`` ``kv_seconds(min(to compute, chunk budget))`` later;
each decode step yields one token; the first gap runs from the first token to the end of
the request's first decode step.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from kvcake.common.errors import InvalidParamsError
from kvcake.sim.profile import Profile
from kvcake.sim.report import summarise
from kvcake.sim.request import TRANSITIONS, Phase, SimRequest
from kvcake.sim.simulator import SimConfig, Simulator

TOY = Profile(
    name="toy", description="round numbers", block_tokens=4, kv_bytes_per_token=1000,
    prefill_fixed_s=0.0, prefill_per_token_s=0.001, prefill_attention_s=0.0,
    prefill_chunk_tokens=8, decode_fixed_s=0.01, decode_per_request_s=0.001,
    decode_per_context_token_s=0.0, network_bytes_per_s=1e6, cache_blocks=100,
    decode_kv_tokens=1000, max_batch=4)


def req(rid: str, arrival_s: float, prompt: int, output: int) -> SimRequest:
    """A request with its own blocks (no prefix shared with any other)."""
    return SimRequest(request_id=rid, row=0, arrival_s=arrival_s, num_prompt_tokens=prompt,
                      num_output_tokens=output,
                      block_keys=tuple(f"{rid}.{j}" for j in range(prompt // 4)),
                      block_tokens=4)


def simulate(requests: list[SimRequest], profile: Profile = TOY, **fields: Any) -> Simulator:
    """Run ``requests`` on 1 prefill + 1 decode instance (or what ``fields`` say)."""
    fields.setdefault("num_prefill", 1)
    fields.setdefault("num_decode", 1)
    fields.setdefault("keep_gaps", True)
    sim = Simulator(SimConfig(profile, **fields), requests)
    sim.run()
    sim.service.check_integrity()
    return sim


def durations(sim: Simulator, instance_id: str) -> list[float]:
    return list(sim.instances[instance_id].durations)


def approx(values: list[float]) -> Any:
    return pytest.approx(values, abs=1e-12)


# ----- one request, disaggregated
def test_one_request_prefills_transfers_and_decodes() -> None:
    a = req("a", 0.0, prompt=6, output=3)
    sim = simulate([a])
    # prefill: 6 tokens, one step of 6 ms -> first token at 6 ms
    assert (a.phase, a.prefill_id, a.decode_id) == (Phase.FINISHED, "prefill-00", "decode-00")
    assert a.prefill_start_s == 0.0
    assert a.first_token_s == pytest.approx(0.006)
    assert a.ttft_s == pytest.approx(0.006)
    # KV of 6 tokens: 6 ms -> at 12 ms; two decode steps of 11 ms -> tokens at 23 and 34 ms
    assert a.gaps == approx([0.017, 0.011])
    assert a.first_gap_s == pytest.approx(0.017)
    assert a.finish_s == pytest.approx(0.034)
    assert a.tbt_s == pytest.approx(0.017)  # slowest ceil(10 %) of 2 gaps: the first
    assert durations(sim, "prefill-00") == approx([0.006])
    assert durations(sim, "decode-00") == approx([0.011, 0.011])
    assert (a.local_blocks, a.pulled_blocks, a.num_computed) == (0, 0, 6)
    assert sim.instances["decode-00"].busy_s == pytest.approx(0.022)
    assert not sim.service.requests
    assert sim.events.now == pytest.approx(0.034)


def test_a_second_token_gap_is_transfer_plus_one_step_and_kv_is_sent_after_the_last_chunk(
        ) -> None:
    a = req("a", 1.0, prompt=8, output=2)  # fills one step exactly
    simulate([a])
    assert a.first_token_s == pytest.approx(1.008)
    # 8 tokens of KV (8 ms), then one step of 11 ms
    assert a.gaps == approx([0.019])
    assert [a.finish_s, a.tbt_s] == approx([1.027, 0.019])


def test_tbt_is_the_mean_of_the_slowest_tenth_of_gaps_first_gap_included() -> None:
    # a: 12 tokens -> 11 gaps -> the slowest 2 count. b shares one of a's steps (12 ms).
    a = req("a", 0.0, prompt=4, output=12)
    b = req("b", 0.020, prompt=4, output=2)
    sim = simulate([a, b])
    # a: first token 4 ms, KV 4 ms later (8 ms); steps from 8 ms: 11, 11, then b joins: 12
    assert a.first_token_s == pytest.approx(0.004)
    # b: prefill 20..24 ms, KV at 28 ms, waits for the step running 19..30 ms, then 30..42
    assert b.first_token_s == pytest.approx(0.024)
    assert b.gaps == approx([0.018])
    assert [b.finish_s, b.tbt_s] == approx([0.042, 0.018])
    assert durations(sim, "decode-00") == approx([0.011, 0.011, 0.012, *[0.011] * 8])
    assert a.gaps == approx([0.015, 0.011, 0.012, *[0.011] * 8])
    assert len(a.gaps) == a.num_output_tokens - 1
    assert a.tbt_s == pytest.approx((0.015 + 0.012) / 2)
    assert a.finish_s == pytest.approx(0.008 + 10 * 0.011 + 0.012)


def test_a_chunked_prompt_sends_only_its_last_chunk_after_the_first_token() -> None:
    a = req("a", 0.0, prompt=20, output=2)  # chunks of 8, 8 and 4 tokens
    simulate([a])
    assert a.first_token_s == pytest.approx(0.020)
    # the last chunk's 4 tokens of KV (4 ms), then one step of 11 ms; the code sends 8 tokens
    assert a.gaps == approx([0.015])


def test_one_output_token_finishes_at_prefill_end_without_tbt() -> None:
    a = req("a", 0.5, prompt=7, output=1)
    sim = simulate([a])
    assert a.phase is Phase.FINISHED
    assert a.first_token_s == a.finish_s == pytest.approx(0.507)
    assert a.tbt_s is None
    assert a.gaps == []
    assert durations(sim, "decode-00") == []  # never reached its decode instance
    assert a.decode_join_step == -1
    assert not sim.service.requests


# ----- chunked prefill
@pytest.mark.parametrize(("prompt", "steps"), [(1, 1), (8, 1), (9, 2), (16, 2), (17, 3),
                                               (20, 3)])
def test_a_prompt_longer_than_the_budget_takes_ceil_n_over_budget_steps(prompt: int,
                                                                         steps: int) -> None:
    profile = replace(TOY, prefill_fixed_s=0.002)  # paid once per step: counts the steps
    a = req("a", 0.0, prompt=prompt, output=1)
    sim = simulate([a], profile)
    chunks = [8] * (prompt // 8) + ([prompt % 8] if prompt % 8 else [])
    assert len(chunks) == steps
    assert durations(sim, "prefill-00") == approx([0.002 + 0.001 * c for c in chunks])
    assert a.first_token_s == pytest.approx(steps * 0.002 + prompt * 0.001)
    assert a.num_computed == prompt


def test_an_idle_instance_starts_at_once_with_what_has_arrived() -> None:
    # a's arrival wakes the instance, whose step starts before b's arrival at the same instant
    a, b = req("a", 0.0, prompt=5, output=1), req("b", 0.0, prompt=2, output=1)
    sim = simulate([a, b])
    assert durations(sim, "prefill-00") == approx([0.005, 0.002])
    assert [a.first_token_s, b.first_token_s] == approx([0.005, 0.007])
    assert [a.prefill_start_s, b.prefill_start_s] == approx([0.0, 0.005])


def test_prompts_share_a_step_oldest_first_and_pay_the_fixed_cost_once() -> None:
    profile = replace(TOY, prefill_fixed_s=0.002)
    z = req("z", 0.0, prompt=1, output=1)  # keeps the instance busy while a and b queue
    a, b = req("a", 0.001, prompt=5, output=1), req("b", 0.002, prompt=6, output=1)
    sim = simulate([z, a, b], profile)
    # step 0: z (3 ms); step 1: a's 5 tokens and 3 of b's, one fixed cost; step 2: b's last 3
    assert durations(sim, "prefill-00") == approx([0.003, 0.002 + 0.008, 0.002 + 0.003])
    assert a.first_token_s == pytest.approx(0.013)
    assert b.first_token_s == pytest.approx(0.018)
    assert a.prefill_start_s == b.prefill_start_s == pytest.approx(0.003)


def test_chunked_attention_costs_what_one_pass_would() -> None:
    """new²/2 + new·cached pairs per chunk: chunks of 8 + 8 touch 32 + 96 = 16²/2 pairs."""
    attention = 1e-4
    chunked = replace(TOY, prefill_attention_s=attention)
    whole = replace(chunked, prefill_chunk_tokens=16)
    a, b = req("a", 0.0, prompt=16, output=1), req("b", 0.0, prompt=16, output=1)
    sim_chunked, sim_whole = simulate([a], chunked), simulate([b], whole)
    assert durations(sim_chunked, "prefill-00") == approx([0.008 + 32 * attention,
                                                           0.008 + 96 * attention])
    assert durations(sim_whole, "prefill-00") == approx([0.016 + 128 * attention])
    assert a.first_token_s == pytest.approx(b.first_token_s)


# ----- colocated
def test_a_colocated_prefill_chunk_stretches_the_decode_gap_beside_it() -> None:
    a = req("a", 0.0, prompt=4, output=4)
    b = req("b", 0.010, prompt=6, output=2)
    sim = simulate([a, b], num_prefill=0, num_decode=0, num_colocated=1)
    assert a.prefill_id == a.decode_id == b.prefill_id == b.decode_id == "colocated-00"
    # step 0: a's prefill (4 ms); step 1: a decodes alone (11 ms, ends 15 ms); step 2: a
    # decodes beside b's 6-token chunk (11 + 6 ms, ends 32 ms); step 3: both decode (12 ms)
    assert durations(sim, "colocated-00") == approx([0.004, 0.011, 0.017, 0.012])
    assert a.first_token_s == pytest.approx(0.004)
    assert a.gaps == approx([0.011, 0.017, 0.012])
    assert a.tbt_s == pytest.approx(0.017)
    assert b.ttft_s == pytest.approx(0.022)
    assert b.gaps == approx([0.012])
    assert a.finish_s == b.finish_s == pytest.approx(0.044)
    alone = req("a", 0.0, prompt=4, output=4)
    simulate([alone], num_prefill=0, num_decode=0, num_colocated=1)
    assert alone.gaps == approx([0.011, 0.011, 0.011])


def test_decoding_requests_take_tokens_from_the_step_budget() -> None:
    # 3 decoding requests leave 5 of the 8 tokens for c's prompt of 9: two chunks, 5 + 4
    profile = replace(TOY, prefill_fixed_s=0.002)
    early = [req(f"d{n}", 0.0, prompt=1, output=20) for n in range(3)]
    c = req("c", 0.005, prompt=9, output=1)
    sim = simulate([*early, c], profile, num_prefill=0, num_decode=0, num_colocated=1)
    steps = durations(sim, "colocated-00")
    # step 0: d0's prompt alone (it woke the instance); step 1: d0 decodes beside d1's and
    # d2's prompts (11 + 2 + 1 + 1 ms); step 2: three decodes (13 ms) and 5 of c's tokens;
    # step 3: three decodes and c's last 4
    assert steps[:4] == approx([0.003, 0.011 + 0.004, 0.013 + 0.002 + 0.005,
                                0.013 + 0.002 + 0.004])
    assert c.first_token_s == pytest.approx(0.003 + 0.015 + 0.020 + 0.019)
    assert c.prefill_start_s == pytest.approx(0.018)


# ----- decode seats
@pytest.mark.parametrize("profile", [replace(TOY, max_batch=1),
                                     replace(TOY, decode_kv_tokens=10)],
                         ids=["max_batch", "decode_kv_tokens"])
def test_a_full_decode_instance_makes_the_next_request_wait(profile: Profile) -> None:
    # a (context 4 + 3) prefills 0..4 ms, its KV lands at 8 ms; b (context 4 + 2) prefills
    # 4..8 ms, its KV lands at 12 ms, during a's first decode step (8..19 ms)
    a, b = req("a", 0.0, prompt=4, output=3), req("b", 0.0, prompt=4, output=2)
    sim = simulate([a, b], profile)
    assert [a.first_token_s, b.first_token_s] == approx([0.004, 0.008])
    # a decodes 8..19..30 ms alone; b is seated only when a leaves: 30..41 ms
    assert durations(sim, "decode-00") == approx([0.011, 0.011, 0.011])
    assert a.gaps == approx([0.015, 0.011])
    assert b.gaps == approx([0.033])
    assert [a.finish_s, b.finish_s] == approx([0.030, 0.041])
    assert (a.decode_join_step, b.decode_join_step) == (0, 2)
    # with room, b joins a's second step: one step of 12 ms for both
    c, d = req("c", 0.0, prompt=4, output=3), req("d", 0.0, prompt=4, output=2)
    roomy = simulate([c, d])
    assert durations(roomy, "decode-00") == approx([0.011, 0.012])
    assert d.gaps == approx([0.023])
    assert c.finish_s == d.finish_s == pytest.approx(0.031)


def test_a_lone_request_too_big_for_the_decode_kv_still_runs() -> None:
    a = req("a", 0.0, prompt=8, output=3)  # context 11 > 10
    sim = simulate([a], replace(TOY, decode_kv_tokens=10))
    assert a.phase is Phase.FINISHED
    assert durations(sim, "decode-00") == approx([0.011, 0.011])


@pytest.mark.parametrize(("fields", "rejected"), [
    ({"profile": replace(TOY, max_batch=1)}, True),  # no seat for b
    ({"profile": replace(TOY, decode_kv_tokens=10)}, True),  # no KV for b
    ({"slo_tbt_s": 0.0115}, True),  # a batch of 2 steps 12 ms > 11.5 ms
    ({"slo_tbt_s": 0.012}, False),  # 12 ms is within the objective
    ({}, False),
])
def test_reject_at_decode_refuses_a_request_the_decode_instance_cannot_take(
        fields: dict[str, Any], rejected: bool) -> None:
    a, b = req("a", 0.0, prompt=4, output=3), req("b", 0.0, prompt=4, output=2)
    profile = fields.pop("profile", TOY)
    sim = simulate([a, b], profile, reject_at_decode=True, **fields)
    assert a.phase is Phase.FINISHED
    assert b.first_token_s == pytest.approx(0.008)  # the prefill ran (and is wasted)
    if rejected:
        assert (b.phase, b.rejected_reason) == (Phase.REJECTED, "tbt_slo_at_decode")
        assert (b.finish_s, b.tbt_s, b.decode_join_step) == (None, None, -1)
        assert durations(sim, "decode-00") == approx([0.011, 0.011])
        summary = summarise(sim.config, [a, b])
        assert (summary["num_rejected"], summary["rejections"]) == (1, {"tbt_slo_at_decode": 1})
    else:
        assert b.phase is Phase.FINISHED and b.rejected_reason is None
        assert durations(sim, "decode-00") == approx([0.011, 0.012])
    assert not sim.service.requests


def test_without_reject_at_decode_a_full_instance_queues_instead() -> None:
    a, b = req("a", 0.0, prompt=4, output=3), req("b", 0.0, prompt=4, output=2)
    simulate([a, b], replace(TOY, max_batch=1), reject_at_decode=False)
    assert a.phase is b.phase is Phase.FINISHED


def test_reject_at_decode_prices_the_waiting_requests_context() -> None:
    """Decode step = 10 ms + 0.1 ms per context token; the TBT objective allows 900 tokens.

    a (prompt 100) decodes from 0.2 s; b and c (prompts 400, on their own prefill instances)
    both reach decode-00 at 0.8 s, during a's step 27 (a holds 128 tokens). b waits for the
    next step; c, arriving next, would make that step hold 129 + 401 + 401 = 931 tokens
    (103.1 ms), so reject_at_decode must refuse c. The simulator prices c at 128 + 400
    tokens (b's waiting prompt left out) and admits it: the next two steps take 103.1 and
    103.4 ms.
    """
    profile = replace(TOY, prefill_chunk_tokens=1000, decode_per_request_s=0.0,
                      decode_per_context_token_s=0.0001, max_batch=64, decode_kv_tokens=100_000)
    a = req("a", 0.0, prompt=100, output=100)
    b, c = req("b", 0.0, prompt=400, output=3), req("c", 0.0, prompt=400, output=3)
    sim = simulate([a, b, c], profile, num_prefill=3, reject_at_decode=True, slo_tbt_s=0.1)
    assert (b.prefill_id, c.prefill_id) == ("prefill-01", "prefill-02")
    assert b.phase is Phase.FINISHED
    assert (c.phase, c.rejected_reason) == (Phase.REJECTED, "tbt_slo_at_decode")
    assert max(durations(sim, "decode-00")) <= 0.1


# ----- the request's lifecycle table
EXPECTED_MOVES = {  # the module docstring's diagram, by hand
    Phase.ARRIVED: {Phase.PREFILLING, Phase.REJECTED},
    Phase.PREFILLING: {Phase.TRANSFERRING, Phase.DECODE_WAITING, Phase.FINISHED},
    Phase.TRANSFERRING: {Phase.DECODE_WAITING, Phase.REJECTED},
    Phase.DECODE_WAITING: {Phase.DECODING},
    Phase.DECODING: {Phase.FINISHED},
    Phase.FINISHED: set(),
    Phase.REJECTED: set(),
}


def test_the_transition_table_is_the_diagram() -> None:
    assert {k: set(v) for k, v in TRANSITIONS.items()} == EXPECTED_MOVES


@pytest.mark.parametrize("start", list(Phase))
@pytest.mark.parametrize("to", list(Phase))
def test_move_allows_exactly_the_table(start: Phase, to: Phase) -> None:
    request = req("r1", 0.0, prompt=4, output=2)
    request.phase = start
    if to in EXPECTED_MOVES[start]:
        request.move(to)
        assert request.phase is to
        return
    with pytest.raises(InvalidParamsError) as caught:
        request.move(to)
    assert str(caught.value) == (f"INVALID_PARAMS: request 'r1': {start.value} -> {to.value} "
                                 f"is not a legal move")
    assert request.phase is start


def test_a_request_walks_the_disaggregated_path() -> None:
    request = req("r", 0.0, prompt=4, output=2)
    path = [Phase.PREFILLING, Phase.TRANSFERRING, Phase.DECODE_WAITING, Phase.DECODING,
            Phase.FINISHED]
    seen = [request.phase]
    for phase in path:
        request.move(phase)
        seen.append(request.phase)
    assert seen == [Phase.ARRIVED, *path]
    with pytest.raises(InvalidParamsError, match="'r': finished -> arrived is not a legal"):
        request.move(Phase.ARRIVED)


def test_request_properties() -> None:
    request = req("r", 2.0, prompt=18, output=5)
    assert request.block_keys == ("r.0", "r.1", "r.2", "r.3")
    assert (request.num_decode_steps, request.context_tokens) == (4, 23)
    assert (request.reused_tokens, request.num_to_compute, request.ttft_s) == (0, 18, None)
    request.local_blocks, request.pulled_blocks = 1, 2
    assert (request.reused_tokens, request.num_to_compute) == (12, 6)
    request.first_token_s = 2.5
    assert request.ttft_s == 0.5


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_prefill": 0, "num_decode": 1}, "a cluster needs prefill >= 1 and decode >= 1, or "
                                          "colocated >= 1 alone"),
    ({"num_prefill": 1, "num_decode": 0, "num_colocated": 1},
     "a cluster needs prefill >= 1 and decode >= 1, or colocated >= 1 alone"),
    ({"num_prefill": -1}, "instance counts must be >= 0, got prefill -1, decode 8, colocated 0"),
    ({"pool_capacity_blocks": -1}, "pool capacity must be >= 0 blocks, got -1"),
    ({"policy": "fastest"}, "policy must be one of cache_aware, kvcache_centric, least_loaded, "
                            "random, round_robin; got 'fastest'"),
])
def test_sim_config_names_what_is_wrong(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidParamsError) as caught:
        SimConfig(TOY, **fields)
    assert str(caught.value) == f"INVALID_PARAMS: {message}"


def test_sim_config_hands_the_profile_to_the_conductor() -> None:
    config = SimConfig(TOY, policy="cache_aware", admission="early", slo_tbt_s=0.05, seed=3,
                       pull_from_instances=False)
    conductor = config.conductor
    assert (conductor.policy, conductor.admission, conductor.block_size,
            conductor.kv_bytes_per_token, conductor.slo_tbt_s, conductor.seed,
            conductor.pull_from_instances) == ("cache_aware", "early", 4, 1000, 0.05, 3, False)
    sim = Simulator(SimConfig(TOY, num_prefill=2, num_decode=1, num_colocated=1), [])
    stats = sim.service.stats().instances
    assert {i: (s.role, s.num_blocks) for i, s in stats.items()} == {
        "prefill-00": ("prefill", 100), "prefill-01": ("prefill", 100),
        "decode-00": ("decode", 250), "colocated-00": ("both", 250)}  # KV 1000 / 4
