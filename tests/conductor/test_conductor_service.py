"""ConductorService scenarios: exact instances chosen, pulls, admissions and lifecycle.

Costs are round numbers, so every choice below can be checked by hand: prefill 1 ms per
computed token, a pulled block 10 ms, TBT 10 ms + 10 ms per request in the batch.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError
from kvcake.common.hashing import prefix_block_hashes
from kvcake.conductor import (
    ConductorConfig,
    ConductorService,
    CostDefaults,
    CostModel,
    InstanceLoad,
    KVEvent,
    PrefillSample,
    RouteRequest,
    TransferSample,
    make_policy,
)

B = 16
KV_BYTES = 1000  # per token: one block is 16,000 bytes
COST = CostDefaults(prefill_fixed_s=0.0, prefill_per_token_s=0.001, decode_fixed_s=0.01,
                    decode_per_request_s=0.01, bandwidth_bytes_per_s=1.6e6)
DOC_A = 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_service(**fields: Any) -> ConductorService:
    fields.setdefault("block_size", B)
    fields.setdefault("kv_bytes_per_token", KV_BYTES)
    return ConductorService(ConductorConfig(**fields), FakeClock(), cost=CostModel(COST))


def hashes(doc: int, num_tokens: int) -> tuple[bytes, ...]:
    return tuple(prefix_block_hashes([doc * 1_000_000 + i for i in range(num_tokens)], B))


def request(rid: str, doc: int, num_tokens: int, out: int = 10, store: int = 0) -> RouteRequest:
    return RouteRequest(rid, num_tokens, hashes(doc, num_tokens), out, store)


def hold(service: ConductorService, instance_id: str, doc: int, num_blocks: int) -> None:
    """``instance_id`` reports that it stores the first ``num_blocks`` blocks of ``doc``."""
    seq = service.index.last_seq(instance_id) + 1
    blocks = list(hashes(doc, num_blocks * B))
    assert service.apply_events(instance_id, [KVEvent(seq, "stored", blocks)])


def route_ids(service: ConductorService, *requests: RouteRequest) -> list[tuple[str, str]]:
    decisions = [service.route(r) for r in requests]
    assert all(d.accepted for d in decisions), decisions
    return [(d.prefill_id or "", d.decode_id or "") for d in decisions]


def assert_invalid(call: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidParamsError) as caught:
        call()
    assert str(caught.value) == f"INVALID_PARAMS: {message}"


def three_prefill_cluster(policy: str) -> ConductorService:
    """p1, p2, p3 with queues 0.35 / 0.10 / 0.05 s (one filler each, placed by ``policy``
    itself as each instance joins), d1 with two requests bound, d2 with one; p1 holds 30
    blocks of document A, p2 10, p3 none."""
    service = make_service(policy=policy)
    service.add_instance("d1", "decode", 1000)
    service.add_instance("d2", "decode", 1000)
    for instance_id, num_tokens, doc in (("p1", 350, 101), ("p2", 100, 102), ("p3", 50, 103)):
        service.add_instance(instance_id, "prefill", 1000)
        assert service.route(request(f"filler-{instance_id}", doc, num_tokens)).prefill_id \
            == instance_id
    hold(service, "p1", DOC_A, 30)
    hold(service, "p2", DOC_A, 10)
    return service


@pytest.mark.parametrize(("policy", "prefill_id", "local", "reused", "pull_from", "ttft_s"), [
    ("round_robin", "p1", 30, 30, None, 0.35 + 0.16),  # next after p3 wraps round
    ("least_loaded", "p3", 0, 0, None, 0.05 + 0.64),  # shortest queue
    ("cache_aware", "p1", 30, 30, None, 0.35 + 0.16),  # p2: 0.10 + 0.48, p3: 0.05 + 0.64
    ("kvcache_centric", "p2", 10, 30, "p1", 0.10 + 0.20 + 0.16),  # 30/10 > 2: pull 20
])
def test_each_policy_picks_its_instance(policy: str, prefill_id: str, local: int, reused: int,
                                        pull_from: str | None, ttft_s: float) -> None:
    service = three_prefill_cluster(policy)
    decision = service.route(request("r", DOC_A, 640))  # 40 blocks, 39 reusable
    assert decision.accepted and decision.reason is None
    assert (decision.prefill_id, decision.decode_id) == (prefill_id, "d2")  # d1 has 2, d2 1
    assert (decision.local_hit_blocks, decision.reused_blocks) == (local, reused)
    assert decision.pull_from == pull_from
    assert decision.predicted_ttft_s == pytest.approx(ttft_s)
    assert decision.predicted_tbt_s == pytest.approx(0.03)
    service.check_integrity()


def test_a_pulled_prefix_becomes_a_replica() -> None:
    service = three_prefill_cluster("kvcache_centric")
    assert service.route(request("r1", DOC_A, 640)).pull_from == "p1"
    assert service.index.match("p2", hashes(DOC_A, 640)) == 40
    assert service.stats().instances["p2"].num_indexed_blocks == 6 + 40  # filler + document
    second = service.route(request("r2", DOC_A, 640))  # p2 now holds it all: no pull
    assert (second.prefill_id, second.local_hit_blocks, second.reused_blocks) == ("p2", 39, 39)
    assert second.pull_from is None
    assert second.predicted_ttft_s == pytest.approx(0.10 + 0.16 + 0.016)
    service.check_integrity()


def test_measured_samples_steer_the_choice() -> None:
    service = three_prefill_cluster("kvcache_centric")
    service.observe_transfer(TransferSample(16_000, 0.1))  # 100 ms per block now
    decision = service.route(request("r", DOC_A, 640))
    assert (decision.prefill_id, decision.reused_blocks, decision.pull_from) == ("p1", 30, None)
    for num_tokens in (100, 200, 300, 400):  # prefill measured at 2 ms per token
        service.observe_prefill(PrefillSample(num_tokens, 0, 0.002 * num_tokens))
    again = service.route(request("r2", DOC_A, 640))  # p1 holds all 40 blocks now
    assert (again.prefill_id, again.reused_blocks) == ("p1", 39)
    assert again.predicted_ttft_s == pytest.approx(0.35 + 0.16 + 16 * 0.002)


def test_an_instance_slower_than_predicted_is_priced_by_its_drain_fit() -> None:
    """p1's prefills end twice as late as the cost model says (0.1 s predicted for 100
    tokens, 0.2 s observed): its drain fit learns an own factor of 2, and a new request goes to p2,
    whose 0.1 s stands; a failed prefill teaches nothing."""
    service = make_service(policy="kvcache_centric")
    clock = service.clock
    assert isinstance(clock, FakeClock)
    service.add_instance("p1", "prefill", 1000)
    service.add_instance("d1", "decode", 1000)
    for i in range(4):
        assert service.route(request(f"w{i}", 300 + i, 100)).predicted_ttft_s \
            == pytest.approx(0.1)
        clock.now += 0.2
        timing = service.prefill_done(f"w{i}")
        assert (timing.predicted_s, timing.observed_s) == pytest.approx((0.1, 0.2))
        service.finished(f"w{i}")
    assert service.stats().instances["p1"].drain == pytest.approx((1.0, 2.0))
    service.add_instance("p2", "prefill", 1000)
    decision = service.route(request("r", 400, 100))
    assert (decision.prefill_id, decision.predicted_ttft_s) == ("p2", pytest.approx(0.1))
    assert service.route(request("f", 401, 50)).prefill_id == "p1"  # 0.1 s; p2 0.1 + 0.05
    clock.now += 10.0
    service.prefill_done("f", ok=False)
    assert service.stats().instances["p1"].drain == pytest.approx((1.0, 2.0))
    assert service.prefilling("r") and not service.prefilling("f")
    service.check_integrity()


def pull_scenario(p2_blocks: int, store_blocks: int, **fields: Any) -> ConductorService:
    """p1 holds 10 blocks of A and is idle; p2 holds ``p2_blocks`` behind a 10 s queue."""
    service = make_service(**fields)
    service.add_instance("d1", "decode", 1000)
    service.add_instance("p2", "prefill", 1000)
    assert service.route(request("busy", 200, 10_000)).prefill_id == "p2"
    service.add_instance("p1", "prefill", 1000)
    hold(service, "p1", DOC_A, 10)
    if p2_blocks:
        hold(service, "p2", DOC_A, p2_blocks)
    return service


@pytest.mark.parametrize(("p2_blocks", "store_blocks", "threshold", "reused", "pull_from"), [
    (20, 0, 2.0, 10, None),  # 20 / 10 = 2.0 is not above the threshold
    (21, 0, 2.0, 21, "p2"),  # 2.1 is
    (20, 0, 1.0, 20, "p2"),
    (21, 21, 2.0, 21, "store"),  # a tie goes to the store
    (21, 20, 2.0, 21, "p2"),
    (21, 25, 2.0, 25, "store"),
    (0, 0, 2.0, 10, None),
])
def test_algorithm_1_threshold_and_source(p2_blocks: int, store_blocks: int, threshold: float,
                                          reused: int, pull_from: str | None) -> None:
    service = pull_scenario(p2_blocks, store_blocks, balancing_threshold=threshold)
    decision = service.route(request("r", DOC_A, 640, store=store_blocks))
    assert (decision.prefill_id, decision.local_hit_blocks) == ("p1", 10)
    assert (decision.reused_blocks, decision.pull_from) == (reused, pull_from)
    pulled_s = (reused - 10) * 0.01
    assert decision.predicted_ttft_s == pytest.approx(pulled_s + (640 - reused * B) * 0.001)
    service.check_integrity()


@pytest.mark.parametrize(("store_blocks", "reused", "pull_from"), [
    (0, 10, None),  # p2 holds 21 blocks, but caches are not pulled from: only the store's
    (21, 21, "store"),
])
def test_without_instance_pulls_only_the_store_counts(store_blocks: int, reused: int,
                                                      pull_from: str | None) -> None:
    service = pull_scenario(21, store_blocks, pull_from_instances=False)
    decision = service.route(request("r", DOC_A, 640, store=store_blocks))
    assert (decision.prefill_id, decision.reused_blocks, decision.pull_from) == (
        "p1", reused, pull_from)
    service.check_integrity()


def test_a_local_miss_pulls_any_remote_hit_and_one_token_is_always_computed() -> None:
    service = make_service()
    service.add_instance("d1", "decode", 1000)
    service.add_instance("p1", "prefill", 1000)
    decision = service.route(request("r1", DOC_A, 640, store=1))
    assert (decision.local_hit_blocks, decision.reused_blocks) == (0, 1)  # 0 local: pull
    assert decision.pull_from == "store"
    service.prefill_done("r1")
    full = service.route(request("r2", DOC_A, 640))  # all 40 blocks held: the last recomputed
    assert (full.local_hit_blocks, full.reused_blocks) == (39, 39)
    assert full.predicted_ttft_s == pytest.approx(0.016)
    tail = service.route(request("r3", DOC_A, 650))  # 40 full blocks and a 10-token tail
    assert tail.reused_blocks == 40
    assert tail.predicted_ttft_s == pytest.approx(0.016 + 0.010)  # r2 still queued


def test_round_robin_cycles_in_id_order_and_skips_rejected_routes() -> None:
    service = make_service(policy="round_robin", admission="early", slo_ttft_s=0.5)
    for instance_id in ("p3", "p1", "p2"):
        service.add_instance(instance_id, "prefill", 100)
    for instance_id in ("d2", "d1"):
        service.add_instance(instance_id, "decode", 100)
    short = [request(f"r{i}", 10 + i, 16) for i in range(5)]
    assert route_ids(service, *short) == [("p1", "d1"), ("p2", "d2"), ("p3", "d1"),
                                          ("p1", "d2"), ("p2", "d1")]
    rejected = service.route(request("long", 50, 1000))  # would have gone to p3
    assert (rejected.reason, rejected.prefill_id) == ("ttft_slo", "p3")
    service.add_instance("p0", "prefill", 100)
    assert route_ids(service, request("a", 60, 16), request("b", 61, 16)) == [("p3", "d2"),
                                                                             ("p0", "d1")]


def test_random_is_reproducible_from_its_seed() -> None:
    def choices(service: ConductorService) -> list[tuple[str, str]]:
        for instance_id, role in (("p1", "prefill"), ("p2", "prefill"), ("p3", "prefill"),
                                  ("d1", "decode"), ("d2", "decode")):
            service.add_instance(instance_id, role, 100)
        return route_ids(service, *(request(f"r{i}", i, 32) for i in range(30)))

    seeded = choices(make_service(policy="random", seed=7))
    assert seeded == choices(make_service(policy="random", seed=7))
    injected = ConductorService(ConductorConfig(policy="random", block_size=B), FakeClock(),
                                rng=random.Random(7), cost=CostModel(COST))
    assert choices(injected) == seeded
    assert {p for p, _ in seeded} == {"p1", "p2", "p3"} and {d for _, d in seeded} == {"d1", "d2"}
    assert seeded != choices(make_service(policy="random", seed=8))


def test_both_instances_decode_what_they_prefill() -> None:
    service = make_service(policy="round_robin")
    for instance_id, role in (("p1", "prefill"), ("d1", "decode"), ("b1", "both")):
        service.add_instance(instance_id, role, 100)
    assert route_ids(service, *(request(f"r{i}", i, 32) for i in range(3))) == [
        ("b1", "b1"), ("p1", "d1"), ("b1", "b1")]
    colocated = make_service()
    colocated.add_instance("b2", "both", 100)
    colocated.add_instance("b1", "both", 100)
    assert route_ids(colocated, request("x", 1, 32), request("y", 2, 32)) == [("b1", "b1"),
                                                                             ("b2", "b2")]
    assert colocated.stats().instances["b1"].num_heading == 1
    colocated.check_integrity()


def single_pair(admission: str, **fields: Any) -> ConductorService:
    """Prefills end at once here (the clock stands still): no drain fit learns from that."""
    service = make_service(admission=admission, slo_tbt_s=0.05, drain_fit=False, **fields)
    service.add_instance("p1", "prefill", 100)
    service.add_instance("d1", "decode", 100)
    assert route_ids(service, *(request(f"d{i}", 10 + i, 16) for i in range(4))) == [
        ("p1", "d1")] * 4  # TBT with 4 in the batch: 0.05, right at the SLO
    return service


@pytest.mark.parametrize(("admission", "reason", "detail"), [
    ("none", None, None),
    ("early", "tbt_slo", "predicted TBT 0.0600 s now on 'd1' (batch 5) > SLO 0.0500 s"),
    ("predictive", None, None),  # the 4 end after 10 * 0.06 s; this one arrives at 1.0 s
])
def test_a_draining_batch_is_rejected_only_by_early(admission: str, reason: str | None,
                                                    detail: str | None) -> None:
    service = single_pair(admission)
    for i in range(4):
        service.prefill_done(f"d{i}")
    before = service.stats()
    decision = service.route(request("r", DOC_A, 1000))
    assert (decision.reason, decision.accepted) == (reason, reason is None)
    assert (decision.prefill_id, decision.decode_id) == ("p1", "d1")
    if detail is not None:
        assert decision.detail == detail
        after = service.stats()
        assert (after.instances, after.num_routed) == (before.instances, before.num_routed)
        assert after.rejections["tbt_slo"] == 1
    service.check_integrity()


@pytest.mark.parametrize(("admission", "reason", "detail"), [
    ("none", None, None),
    ("early", None, None),  # nothing decodes yet
    ("predictive", "tbt_slo",
     "predicted TBT 0.0600 s at +0.080 s on 'd1' (batch 5) > SLO 0.0500 s"),
])
def test_an_arriving_batch_is_rejected_only_by_predictive(admission: str, reason: str | None,
                                                          detail: str | None) -> None:
    service = single_pair(admission)  # the 4 still prefill, ending at 0.016 ... 0.064 s
    decision = service.route(request("r", DOC_A, 16))
    assert (decision.reason, decision.accepted) == (reason, reason is None)
    if detail is not None:
        assert decision.detail == detail
        assert service.stats().num_in_flight == 4


@pytest.mark.parametrize("admission", ["early", "predictive"])
def test_a_slow_first_token_is_rejected(admission: str) -> None:
    service = make_service(admission=admission, slo_ttft_s=0.5)
    service.add_instance("p1", "prefill", 100)
    service.add_instance("d1", "decode", 100)
    decision = service.route(request("r", DOC_A, 1000))
    assert (decision.reason, decision.detail) == (
        "ttft_slo", "predicted TTFT 1.000 s on 'p1' > SLO 0.500 s")
    assert decision.predicted_ttft_s == pytest.approx(1.0)
    assert service.stats().rejections == {"ttft_slo": 1, "tbt_slo": 0,
                                          "no_prefill_instance": 0, "no_decode_instance": 0}
    assert service.stats().num_routed == 0 and service.index.num_blocks("p1") == 0


def test_missing_roles_are_rejections() -> None:
    service = make_service()
    assert service.route(request("r", 1, 32)).reason == "no_prefill_instance"
    service.add_instance("p1", "prefill", 100)
    decision = service.route(request("r", 1, 32))
    assert not decision.accepted and decision.prefill_id is None
    assert decision.reason == "no_decode_instance"
    assert service.stats().rejections["no_prefill_instance"] == 1


def test_a_sequence_gap_waits_for_a_snapshot() -> None:
    service = make_service()
    service.add_instance("p1", "prefill", 100)
    service.add_instance("d1", "decode", 100)
    hold(service, "p1", DOC_A, 5)
    later = KVEvent(3, "stored", list(hashes(DOC_A, 640)))
    assert not service.apply_events("p1", [later])
    assert service.route(request("r1", DOC_A, 640)).local_hit_blocks == 5
    assert service.stats().instances["p1"].num_indexed_blocks == 40  # r1's, optimistically
    service.replace_blocks("p1", 3, hashes(DOC_A, 30 * B))  # the truth as of seq 3
    assert service.stats().instances["p1"].num_indexed_blocks == 30
    more = KVEvent(4, "stored", list(hashes(DOC_A, 35 * B)))
    assert service.apply_events("p1", [later, more])  # seq 3 is in the snapshot: skipped
    assert service.stats().instances["p1"].num_indexed_blocks == 35
    service.check_integrity()


def test_restart_forgets_blocks_and_requests() -> None:
    service = make_service(policy="round_robin")
    for instance_id, role in (("p1", "prefill"), ("d1", "decode")):
        service.add_instance(instance_id, role, 100)
    hold(service, "p1", DOC_A, 8)
    service.report_load("p1", InstanceLoad(1, 2, 3, 4, 5, 100))
    route_ids(service, request("r1", 2, 64), request("r2", 3, 64))
    assert service.remove_instance("p1") == ["r1", "r2"]  # the server: once p1 went silent
    service.add_instance("p1", "prefill", 200)
    p1, d1 = service.stats().instances["p1"], service.stats().instances["d1"]
    assert (p1.num_blocks, p1.num_indexed_blocks, p1.queue_s, p1.num_prefilling) == (200, 0,
                                                                                      0.0, 0)
    assert p1.load is None and d1.num_heading == 0 and service.stats().num_in_flight == 0
    assert service.apply_events("p1", [KVEvent(1, "stored", list(hashes(DOC_A, 32)))])
    service.check_integrity()


def test_a_second_instance_under_a_known_id_is_refused_and_the_first_keeps_its_requests(
        ) -> None:
    service = make_service(policy="round_robin")
    for instance_id, role in (("p1", "prefill"), ("d1", "decode")):
        service.add_instance(instance_id, role, 100)
    route_ids(service, request("r1", 2, 64))
    with pytest.raises(KvcakeError) as caught:
        service.add_instance("d1", "decode", 500)
    assert caught.value.code is ErrorCode.OBJECT_ALREADY_EXISTS
    assert "'d1' is already registered" in str(caught.value)
    d1 = service.stats().instances["d1"]
    assert (d1.num_blocks, d1.num_heading, list(service.requests)) == (100, 1, ["r1"])
    service.check_integrity()


def test_a_huge_max_tokens_counts_only_what_the_context_leaves() -> None:
    """One request asks for a billion tokens: admission books it for what the 1024-token
    context leaves after its prompt, so the decode instance (1600 KV tokens) still seats
    the requests after it instead of turning each away as "no seat"."""
    service = make_service(policy="round_robin", admission="early")
    service.add_instance("p1", "prefill", 100, max_model_len=1024)
    service.add_instance("d1", "decode", 100, max_model_len=1024)  # 1600 tokens of KV
    assert route_ids(service, request("huge", 1, 64, out=10**9)) == [("p1", "d1")]
    assert service.requests["huge"].request.num_output_tokens == 1024 - 64
    later = [service.route(request(f"r{i}", 2 + i, 64, out=100)) for i in range(3)]
    assert [d.accepted for d in later] == [True, True, True], later
    assert service.rejections["tbt_slo"] == 0
    service.check_integrity()


def test_without_a_known_context_max_tokens_is_taken_as_given() -> None:
    service = make_service(policy="round_robin")
    service.add_instance("p1", "prefill", 100)
    service.add_instance("d1", "decode", 100)
    route_ids(service, request("r1", 1, 64, out=5000))
    assert service.requests["r1"].request.num_output_tokens == 5000


def test_remove_instance_returns_what_was_in_flight_on_it() -> None:
    service = make_service(policy="round_robin")
    for instance_id, role in (("p1", "prefill"), ("p2", "prefill"), ("d1", "decode"),
                              ("d2", "decode")):
        service.add_instance(instance_id, role, 100)
    assert route_ids(service, *(request(f"r{i}", i, 32) for i in range(1, 5))) == [
        ("p1", "d1"), ("p2", "d2"), ("p1", "d1"), ("p2", "d2")]
    service.prefill_done("r1")  # decoding on d1: no longer on p1
    assert service.stats().instances["d1"].num_decoding == 1
    assert service.remove_instance("p1") == ["r3"]
    service.check_integrity()  # r1 decodes on without the instance that prefilled it
    assert service.remove_instance("d2") == ["r2", "r4"]
    assert list(service.requests) == ["r1"]
    assert service.stats().instances["p2"].queue_s == 0.0
    service.finished("r3")  # already forgotten: fine
    service.finished("r1")
    assert service.stats().num_in_flight == 0
    service.check_integrity()


def test_a_request_that_ends_before_its_prefill_takes_back_the_blocks_routing_indexed(
        ) -> None:
    """Routing indexes a prompt's blocks on its prefill instance at once (the next request
    of that prefix goes there too); a request aborted or failed before its prefill leaves
    no phantom hit behind, and keeps what the instance confirmed meanwhile."""
    service = make_service(policy="kvcache_centric")
    for instance_id, role in (("p1", "prefill"), ("d1", "decode")):
        service.add_instance(instance_id, role, 100)
    doc = hashes(DOC_A, 160)
    assert route_ids(service, request("r1", DOC_A, 160), request("r2", 2, 64)) == [
        ("p1", "d1"), ("p1", "d1")]
    assert service.index.match("p1", doc) == 10
    hold(service, "p1", DOC_A, 4)  # its first blocks were computed before the abort
    service.finished("r1")
    assert service.index.match("p1", doc) == 4
    service.prefill_done("r2", ok=False)
    assert service.index.match("p1", hashes(2, 64)) == 0
    service.check_integrity()


def test_bad_input_is_refused_by_name() -> None:
    assert_invalid(lambda: ConductorConfig(policy="fastest"), "policy must be one of "
                   "cache_aware, kvcache_centric, least_loaded, random, round_robin; "
                   "got 'fastest'")
    assert_invalid(lambda: ConductorConfig(admission="strict"),
                   "admission must be one of early, none, predictive, ttft; got 'strict'")
    assert_invalid(lambda: ConductorConfig(balancing_threshold=0.5),
                   "balancing_threshold must be >= 1, got 0.5")
    assert_invalid(lambda: ConductorConfig(slo_tbt_s=0), "slo_tbt_s must be > 0, got 0")
    assert_invalid(lambda: ConductorConfig(block_size=0), "block_size must be >= 1, got 0")
    assert_invalid(lambda: make_policy("best", random.Random()), "unknown policy 'best'; "
                   "known: cache_aware, kvcache_centric, least_loaded, random, round_robin")
    assert_invalid(lambda: RouteRequest("r", 0, (), 1), "num_prompt_tokens must be >= 1, got 0")
    assert_invalid(lambda: RouteRequest("r", 40, hashes(1, 40), 1, 3),
                   "store_hit_blocks must be 0..2 (the number of block_hashes), got 3")


def test_bad_calls_are_refused_by_name() -> None:
    service = make_service()
    assert_invalid(lambda: service.add_instance("x", "mixed", 10),
                   "role of 'x' must be one of prefill, decode, both; got 'mixed'")
    assert_invalid(lambda: service.add_instance("store", "prefill", 10),
                   "instance_id must be a non-empty string other than 'store', got 'store'")
    assert_invalid(lambda: service.add_instance("p9", "prefill", -1),
                   "num_blocks of 'p9' must be >= 0, got -1")
    assert_invalid(lambda: service.add_instance("p9", "prefill", 1, -5),
                   "max_model_len of 'p9' must be >= 0, got -5")
    assert_invalid(lambda: service.report_load("ghost", InstanceLoad(0, 0, 0, 0, 0, 0)),
                   "unknown instance 'ghost'")
    assert_invalid(lambda: service.remove_instance("ghost"), "unknown instance 'ghost'")
    service.add_instance("p1", "prefill", 10)
    service.add_instance("d1", "decode", 10)
    assert_invalid(lambda: service.report_load("p1", InstanceLoad(0, 0, 0, 0, 11, 10)),
                   "load of 'p1': num_free_blocks 11 > num_blocks 10")
    assert_invalid(lambda: service.report_load("p1", InstanceLoad(-1, 0, 0, 0, 0, 10)),
                   "load of 'p1': num_waiting must be >= 0, got -1")
    assert_invalid(lambda: service.replace_blocks("p1", -1, []),
                   "snapshot of 'p1': seq must be >= 0, got -1")
    assert_invalid(lambda: service.route(RouteRequest("r", 40, hashes(1, 64), 1)),
                   "request 'r' has 4 block hashes, but 40 tokens fill only 2 blocks of 16")
    service.route(request("r", 1, 40))
    assert_invalid(lambda: service.route(request("r", 2, 40)), "request 'r' is already in flight")
    service.prefill_done("r")
    assert_invalid(lambda: service.prefill_done("r"), "request 'r' has finished prefill already")
    assert_invalid(lambda: service.prefill_done("nope"), "unknown request 'nope'")
    assert service.stats().num_routed == 1
    service.check_integrity()


@pytest.mark.parametrize("admission", ["early", "predictive"])
def test_observed_tbt_above_the_prediction_tightens_admission(admission: str) -> None:
    """Finished requests whose TBT (slowest gaps) ran at twice their predicted step teach the
    cost model a tail of 2: a batch whose step (0.03 s) meets the 0.05 s SLO is then refused,
    as its TBT (0.06 s) would not."""
    service = make_service(admission=admission, slo_tbt_s=0.05)
    service.add_instance("p1", "prefill", 100)
    service.add_instance("d1", "decode", 100)
    for i in range(8):  # one at a time: each predicted at a 0.02 s step, observed at 0.04 s
        assert service.route(request(f"f{i}", 20 + i, 16)).accepted
        service.prefill_done(f"f{i}")
        service.finished(f"f{i}", observed_tbt_s=0.04)
    assert service.cost.num_samples["tbt"] == 8
    assert service.cost.tbt_tail == pytest.approx(2.0)
    assert route_ids(service, request("a", 40, 16)) == [("p1", "d1")]  # 0.02 s x 2: at the SLO
    service.prefill_done("a")
    decision = service.route(request("b", 41, 16))
    assert (decision.accepted, decision.reason) == (False, "tbt_slo")
    assert "(batch 2, tail x2.00) > SLO 0.0500 s" in decision.detail
    service.finished("a")  # aborted or failed: says nothing about TBT
    assert service.cost.num_samples["tbt"] == 8
    service.check_integrity()


def test_a_predicted_hit_is_checked_against_what_the_prefill_reused() -> None:
    service = make_service(policy="cache_aware")
    service.add_instance("p1", "prefill", 100)
    service.add_instance("d1", "decode", 100)
    hold(service, "p1", DOC_A, 8)
    assert service.route(request("r1", DOC_A, 640)).local_hit_blocks == 8
    assert service.check_hit("r1", 8 * B) == (8 * B, 0)  # the index was right
    assert service.check_hit("r1", 5 * B) == (8 * B, 3 * B)  # 3 blocks were not there
    assert service.route(request("r2", DOC_A + 1, 640)).reused_blocks == 0
    assert service.check_hit("r2", 0) == (0, 0)  # nothing predicted, nothing missed
    assert service.check_hit("unknown", 10) == (0, 0)
    centric = make_service(policy="kvcache_centric")
    centric.add_instance("p1", "prefill", 100)
    centric.add_instance("d1", "decode", 100)
    stored = centric.route(request("r3", DOC_A, 640, store=20))
    assert stored.reused_blocks == 20 and stored.pull_from == "store"
    assert centric.check_hit("r3", 12 * B) == (20 * B, 8 * B)  # store blocks gone meanwhile
