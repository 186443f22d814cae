"""Where the simulated Conductor places requests, checked by hand, and that it decides as the
live server's ``ConductorService`` does for the same state.

Costs (``PLACE``) are round numbers::

    prefill_s(new, cached) = 1 ms per new token
    a pulled block (4 tokens of 100 B at 1 MB/s) = 0.4 ms
    blocks of 4 tokens; a step holds 64 tokens; every request makes 1 token (no decode)

Document ``P`` is 10 blocks (40 tokens). A prompt of 48 tokens that starts with ``P`` has
11 reusable blocks ((48 - 1) // 4) and matches 10 of them wherever ``P`` is cached.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from kvcake.common.trace import load_trace
from kvcake.conductor.cost import CostDefaults
from kvcake.conductor.service import ConductorService
from kvcake.conductor.types import STORE, Decision, RouteRequest
from kvcake.sim.profile import Profile, load_profile
from kvcake.sim.request import Phase, SimRequest
from kvcake.sim.simulator import SimConfig, Simulator, block_digest
from kvcake.sim.workload import WorkloadSpec, build_requests

PLACE = Profile(
    name="place", description="round numbers", block_tokens=4, kv_bytes_per_token=100,
    prefill_fixed_s=0.0, prefill_per_token_s=0.001, prefill_attention_s=0.0,
    prefill_chunk_tokens=64, decode_fixed_s=0.01, decode_per_request_s=0.001,
    decode_per_context_token_s=0.0, network_bytes_per_s=1e6, cache_blocks=1000,
    decode_kv_tokens=1000, max_batch=4)
DOC_P = tuple(f"P.{j}" for j in range(10))


def req(rid: str, arrival_s: float, prompt: int, shared: tuple[str, ...] = ()) -> SimRequest:
    """``prompt`` tokens that start with the blocks ``shared``; the rest are its own."""
    keys = (*shared, *(f"{rid}.{j}" for j in range(len(shared), prompt // 4)))
    return SimRequest(request_id=rid, row=0, arrival_s=arrival_s, num_prompt_tokens=prompt,
                      num_output_tokens=1, block_keys=keys, block_tokens=4)


def simulate(requests: list[SimRequest], **fields: Any) -> Simulator:
    fields.setdefault("num_prefill", 2)
    fields.setdefault("num_decode", 1)
    sim = Simulator(SimConfig(PLACE, **fields), requests)
    sim.run()
    return sim


def placement(request: SimRequest) -> tuple[str, str | None, int, int]:
    return request.prefill_id, request.pull_from, request.local_blocks, request.pulled_blocks


# ----- a warm cache
@pytest.mark.parametrize(("policy", "where", "local", "ttft_s"), [
    ("cache_aware", "prefill-00", 10, 0.008),  # 8 tokens to compute beside P
    ("kvcache_centric", "prefill-00", 10, 0.008),
    ("least_loaded", "prefill-00", 10, 0.008),  # queues tie (both idle); then TTFT
    ("round_robin", "prefill-01", 0, 0.048),  # the next instance, cold: all 48 tokens
])
def test_a_shared_prefix_follows_the_warm_cache(policy: str, where: str, local: int,
                                                ttft_s: float) -> None:
    r1 = req("r1", 0.0, 40, DOC_P)
    r2 = req("r2", 1.0, 48, DOC_P)
    sim = simulate([r1, r2], policy=policy)
    assert placement(r1) == ("prefill-00", None, 0, 0)  # ties go to the lowest id
    assert r1.ttft_s == pytest.approx(0.040)
    assert placement(r2) == (where, None, local, 0)
    assert r2.ttft_s == pytest.approx(ttft_s)
    assert (r1.decode_id, r2.decode_id) == ("decode-00", "decode-00")
    # both instances' caches (and the Conductor's index) hold what they computed
    digests = [block_digest(k) for k in r2.block_keys]
    assert sim.service.index.match(where, digests) == 12
    assert sim.instances[where].cache.matched(r2.block_keys) == 12
    assert sim.instances["prefill-00"].cache.matched(DOC_P) == 10
    sim.service.check_integrity()


# ----- Algorithm 1: pull from a busy holder
def busy_holder(**fields: Any) -> tuple[Simulator, SimRequest, SimRequest]:
    """r1 leaves P on prefill-00 (0..40 ms); at 1.0 s ``big`` (2,000 tokens: 2 s) takes the
    idle prefill-00 (a tie, lowest id); at 1.1 s r2 starts with P."""
    r1, big, r2 = req("r1", 0.0, 40, DOC_P), req("big", 1.0, 2000), req("r2", 1.1, 48, DOC_P)
    sim = simulate([r1, big, r2], **fields)
    assert r1.prefill_id == "prefill-00"
    return sim, big, r2


def test_kvcache_centric_pulls_the_prefix_when_the_holder_is_busy() -> None:
    # prefill-00: 2.0 s queue + 8 ms; prefill-01: pull 10 blocks (4 ms) + 8 ms = 12 ms
    _, big, r2 = busy_holder(policy="kvcache_centric")
    assert placement(big) == ("prefill-00", None, 0, 0)
    assert big.first_token_s == pytest.approx(3.0)
    assert placement(r2) == ("prefill-01", "prefill-00", 0, 10)
    assert r2.reused_tokens == 40
    assert r2.num_to_compute == 8
    assert r2.ttft_s == pytest.approx(0.004 + 0.008)


@pytest.mark.parametrize("fields", [{"policy": "cache_aware"},
                                    {"policy": "kvcache_centric", "pull_from_instances": False}])
def test_without_pulls_the_idle_instance_computes_the_whole_prompt(fields: dict[str, Any]
                                                                   ) -> None:
    # prefill-01 reusing nothing (48 ms) still beats prefill-00's 2.008 s
    _, big, r2 = busy_holder(**fields)
    assert big.prefill_id == "prefill-00"
    assert placement(r2) == ("prefill-01", None, 0, 0)
    assert r2.ttft_s == pytest.approx(0.048)


def test_round_robin_ignores_both_cache_and_queue() -> None:
    _, big, r2 = busy_holder(policy="round_robin")
    assert big.prefill_id == "prefill-01"
    assert placement(r2) == ("prefill-00", None, 10, 0)  # lucky: back on the warm instance
    assert r2.ttft_s == pytest.approx(0.008)


def test_with_a_store_tier_the_pull_comes_from_the_store() -> None:
    """As kvcake up runs it: no cache-to-cache pulls; every prefill writes to the store."""
    sim, _, r2 = busy_holder(policy="kvcache_centric", pull_from_instances=False,
                             pool_capacity_blocks=0)
    assert placement(r2) == ("prefill-01", STORE, 0, 10)
    assert r2.ttft_s == pytest.approx(0.004 + 0.008)
    assert sim.pool is not None and sim.pool.matched(r2.block_keys) == 12


def test_a_store_tier_serves_prefixes_whatever_the_policy_chose() -> None:
    # cache_aware prices local prefixes only, but the instance still loads what the store has
    _, _, r2 = busy_holder(policy="cache_aware", pool_capacity_blocks=0)
    assert placement(r2) == ("prefill-01", None, 0, 10)
    assert r2.ttft_s == pytest.approx(0.012)


@pytest.mark.parametrize(("threshold", "pull_from", "pulled", "ttft_s"), [
    (2.0, "prefill-00", 6, 0.0024 + 0.008),  # 10 / 4 = 2.5 > 2: pull 6 blocks
    (3.0, None, 0, 0.032),  # 2.5 <= 3: compute 32 tokens beside the local 4 blocks
])
def test_the_balancing_threshold_decides_whether_a_longer_remote_prefix_is_pulled(
        threshold: float, pull_from: str | None, pulled: int, ttft_s: float) -> None:
    """prefill-01 holds 4 blocks of P, prefill-00 all 10 but is busy with ``big``."""
    r_a = req("rA", 0.0, 40, DOC_P)
    r_b = req("rB", 0.001, 17, DOC_P[:4])
    big, r2 = req("big", 1.0, 2000), req("r2", 1.1, 48, DOC_P)
    simulate([r_a, r_b, big, r2], policy="kvcache_centric", balancing_threshold=threshold)
    # rB: the Conductor, whose index holds P on prefill-00 from the moment rA was routed,
    # prices a pull of 4 blocks (1.6 ms + 1 ms) against prefill-00's 40 ms queue; but rA is
    # still computing, so nothing can be pulled yet and rB computes all 17 tokens
    assert placement(r_b) == ("prefill-01", "prefill-00", 0, 0)
    assert r_b.ttft_s == pytest.approx(0.017)
    assert big.prefill_id == "prefill-00"
    assert placement(r2) == ("prefill-01", pull_from, 4, pulled)
    assert r2.ttft_s == pytest.approx(ttft_s)


# ----- random, seeded
def routes(policy: str, seed: int) -> list[tuple[str, str, float | None]]:
    records = load_trace(limit=80)
    requests = build_requests(records, WorkloadSpec(limit=80), 512)
    config = SimConfig(load_profile("llama2-70b-a800"), num_prefill=4, num_decode=3,
                       policy=policy, seed=seed)
    Simulator(config, requests).run()
    return [(r.prefill_id, r.decode_id, r.ttft_s) for r in requests]


def test_the_random_policy_is_reproducible_with_a_seed() -> None:
    first = routes("random", seed=7)
    assert first == routes("random", seed=7)
    assert first != routes("random", seed=8)
    assert {p for p, _, _ in first} == {f"prefill-{n:02d}" for n in range(4)}
    assert {d for _, d, _ in first} == {f"decode-{n:02d}" for n in range(3)}


# ----- the simulator's Conductor is the live one
def live_like_profile() -> Profile:
    """smollm2-cpu priced with the Conductor's own defaults: a live ConductorService, built
    without a cost model, prices work exactly as the simulated one does."""
    d = CostDefaults()
    profile = replace(load_profile("smollm2-cpu"), name="live-like",
                      prefill_fixed_s=d.prefill_fixed_s, prefill_per_token_s=d.prefill_per_token_s,
                      prefill_attention_s=d.prefill_per_token_cached_s,
                      decode_fixed_s=d.decode_fixed_s, decode_per_request_s=d.decode_per_request_s,
                      decode_per_context_token_s=d.decode_per_context_token_s,
                      network_bytes_per_s=d.bandwidth_bytes_per_s)
    assert profile.cost_defaults() == d
    return profile


def route_request(sim: Simulator, request: SimRequest) -> RouteRequest:
    """The RouteRequest the simulator builds on arrival (store lookup included)."""
    store_hit = sim.pool.matched(request.block_keys) if sim.pool is not None else 0
    return RouteRequest(request.request_id, request.num_prompt_tokens,
                        tuple(block_digest(k) for k in request.block_keys),
                        request.num_output_tokens, store_hit)


def held_blocks(sim: Simulator, instance_id: str, requests: list[SimRequest]) -> set[bytes]:
    """What the simulated Conductor's index says ``instance_id`` holds, read through the
    index's public lookups over every block the run saw."""
    digests = {block_digest(k) for r in requests for k in r.block_keys}
    return {d for d in digests if instance_id in sim.service.index.holders(d)}


@pytest.mark.parametrize("fields", [
    {"policy": "kvcache_centric"},
    {"policy": "kvcache_centric", "pull_from_instances": False, "pool_capacity_blocks": 0},
    {"policy": "cache_aware", "admission": "early"},
    {"policy": "least_loaded", "admission": "ttft", "slo_ttft_s": 20.0},
    {"policy": "kvcache_centric", "admission": "predictive", "slo_ttft_s": 60.0,
     "slo_tbt_s": 0.5},
])
def test_a_live_conductor_service_decides_as_the_simulated_one(fields: dict[str, Any]) -> None:
    profile = live_like_profile()
    # no drain fits: what a run teaches them is state a fresh service has not learned yet
    config = SimConfig(profile, num_prefill=3, num_decode=2, drain_fit=False, **fields)
    records = load_trace(limit=80)
    played = build_requests(records, WorkloadSpec(limit=60), profile.block_tokens)
    sim = Simulator(config, played)
    sim.run()
    # the index mirrors the simulated caches, event for event
    for instance_id, instance in sim.instances.items():
        assert held_blocks(sim, instance_id, played) == \
            {block_digest(k) for k in instance.cache.policy}
    # the live server's set-up: ConductorService(config, clock), then each instance registers
    # with its role, its size and a snapshot of its blocks as of its last event
    live = ConductorService(config.conductor, lambda: sim.events.now)
    for instance_id, stats in sim.service.stats().instances.items():
        live.add_instance(instance_id, stats.role, stats.num_blocks)
        live.replace_blocks(instance_id, sim.service.index.last_seq(instance_id),
                            sorted(held_blocks(sim, instance_id, played)))
    assert live.stats().instances == sim.service.stats().instances
    # the next 20 rows, routed on both (each admitted one stays in flight on both)
    following = build_requests(records, WorkloadSpec(start_row=60, limit=20),
                               profile.block_tokens)
    decisions: list[Decision] = []
    for request in following:
        routed = route_request(sim, request)
        decision = sim.service.route(routed)
        assert live.route(routed) == decision
        decisions.append(decision)
    assert live.stats().instances == sim.service.stats().instances
    assert live.stats().rejections == {reason: sim.service.rejections[reason] - count
                                       for reason, count in sim_rejections(played).items()}
    assert any(d.accepted and d.reused_blocks > 0 for d in decisions)  # not all cold
    live.check_integrity()
    sim.service.check_integrity()


def sim_rejections(requests: list[SimRequest]) -> dict[str, int]:
    """Rejections at routing during the run, by the Conductor's reason codes."""
    counts = dict.fromkeys(("ttft_slo", "tbt_slo", "no_prefill_instance",
                            "no_decode_instance"), 0)
    for request in requests:
        if request.phase is Phase.REJECTED:
            assert request.rejected_reason is not None
            counts[request.rejected_reason] += 1
    return counts
