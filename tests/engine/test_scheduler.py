"""EngineCore and Scheduler scenarios on a tiny random Llama (float32, so greedy is exact).

Every scenario drives the real loop (schedule -> model -> update) and checks, after each
step, that each KV block's ref count equals the number of live requests that hold it.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from kvcake.common.errors import InvalidParamsError
from kvcake.common.lifecycle import IllegalTransitionError
from kvcake.engine.config import EngineConfig
from kvcake.engine.core import EngineCore
from kvcake.engine.request import TRANSITIONS, Request, RequestStatus
from kvcake.engine.scheduler import SchedulerOutput
from kvcake.wire.sampling import SamplingParams

BLOCK = 8
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # layers * (K, V) * kv heads * head dim * float32

MakeCore = Callable[..., EngineCore]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model's ops are too small to split: a second thread only waits on a busy
    machine (100x slower steps when other jobs hold the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_core(tiny_model_dir: Callable[..., Path]) -> MakeCore:
    """``make(num_blocks=64, model=None, **engine_fields)``: an engine on the tiny model with
    a pool of exactly ``num_blocks`` blocks of ``BLOCK`` tokens; ``model`` is a dict of
    ModelConfig overrides (same seeded weights)."""
    made: dict[str, Path] = {}

    def make(num_blocks: int = 64, model: dict[str, Any] | None = None,
             **fields: Any) -> EngineCore:
        name = f"tiny-{len(made)}" if model else "tiny"
        if name not in made:
            made[name] = tiny_model_dir(name=name, **(model or {}))
        config = EngineConfig(model=str(made[name]), dtype="float32", block_size=BLOCK,
                              kv_cache_bytes=num_blocks * BLOCK * KV_BYTES_PER_TOKEN, **fields)
        core = EngineCore(config)
        assert core.scheduler.kv.num_blocks == num_blocks
        return core

    return make


def prompt(seed: int, length: int) -> list[int]:
    """Random token ids that avoid the tiny model's control ids (0..2)."""
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(length)]


def greedy(max_tokens: int, **fields: Any) -> SamplingParams:
    fields.setdefault("ignore_eos", True)
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **fields)


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = -1
    num_outputs: int = 0


def check_blocks(core: EngineCore) -> None:
    """Pool invariants, and each block's ref count == live requests holding it."""
    scheduler = core.scheduler
    pool = scheduler.kv.pool
    pool.check_integrity()
    owners = Counter(b for r in scheduler.running for b in r.block_ids)
    assert [pool.ref_count(b) for b in range(pool.num_blocks)] == [
        owners[b] for b in range(pool.num_blocks)]
    assert all(not r.block_ids for r in scheduler.waiting), "a waiting request holds blocks"


def step(core: EngineCore, results: dict[str, Result]) -> int:
    """One engine step, collected into ``results``; returns how many outputs it made."""
    outputs = core.step()
    for out in outputs:
        result = results.setdefault(out.request_id, Result())
        result.token_ids += out.token_ids
        result.finish_reason = out.finish_reason
        result.num_cached_tokens = out.num_cached_tokens
        result.num_outputs += 1
    check_blocks(core)
    return len(outputs)


def drain(core: EngineCore, results: dict[str, Result] | None = None,
          max_steps: int = 2000) -> dict[str, Result]:
    results = {} if results is None else results
    for _ in range(max_steps):
        if not core.has_unfinished():
            return results
        step(core, results)
    raise AssertionError(f"not done after {max_steps} steps")


def run(core: EngineCore, prompts: dict[str, list[int]], params: SamplingParams,
        tenant: str | None = None) -> dict[str, Result]:
    for request_id, tokens in prompts.items():
        core.add_request(request_id, tokens, params, tenant)
    return drain(core)


def record_schedules(core: EngineCore, monkeypatch: pytest.MonkeyPatch) -> list[SchedulerOutput]:
    """Every SchedulerOutput the engine's scheduler hands out from now on."""
    seen: list[SchedulerOutput] = []
    schedule = core.scheduler.schedule

    def recording() -> SchedulerOutput:
        seen.append(schedule())
        return seen[-1]

    monkeypatch.setattr(core.scheduler, "schedule", recording)
    return seen


def layout(output: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.request.request_id, c.start, c.num_tokens) for c in output.chunks]


# ----- chunked prefill ------------------------------------------------------------------


def test_chunked_prefill_gives_one_shot_tokens_within_budget(
        make_core: MakeCore, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = prompt(1, 70)
    reference = run(make_core(), {"r": tokens}, greedy(8))["r"]
    core = make_core(max_num_batched_tokens=16)
    schedules = record_schedules(core, monkeypatch)
    core.add_request("r", tokens, greedy(8))
    results: dict[str, Result] = {}
    assert [step(core, results) for _ in range(5)] == [0, 0, 0, 0, 1]
    assert results["r"].token_ids == reference.token_ids[:1]
    drain(core, results)
    assert [layout(s) for s in schedules[:7]] == [
        [("r", 0, 16)], [("r", 16, 16)], [("r", 32, 16)], [("r", 48, 16)], [("r", 64, 6)],
        [("r", 70, 1)], [("r", 71, 1)]]
    assert len(schedules) == 5 + 7
    assert max(s.num_tokens for s in schedules) <= 16
    assert results["r"].token_ids == reference.token_ids
    assert results["r"].finish_reason == "length"


def test_budget_is_shared_by_a_long_prefill_and_a_later_admission(
        make_core: MakeCore, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = {"long": prompt(1, 70), "short": prompt(2, 20)}
    reference = {k: run(make_core(), {k: v}, greedy(4))[k] for k, v in prompts.items()}
    core = make_core(max_num_batched_tokens=16)
    schedules = record_schedules(core, monkeypatch)
    results = run(core, prompts, greedy(4))
    assert [layout(s) for s in schedules[:8]] == [
        [("long", 0, 16)], [("long", 16, 16)], [("long", 32, 16)], [("long", 48, 16)],
        [("long", 64, 6), ("short", 0, 10)],  # the 10 tokens left over go to the newcomer
        [("long", 70, 1), ("short", 10, 10)],
        [("long", 71, 1), ("short", 20, 1)],
        [("long", 72, 1), ("short", 21, 1)]]
    assert all(s.num_tokens <= 16 for s in schedules)
    assert {k: r.token_ids for k, r in results.items()} == {
        k: r.token_ids for k, r in reference.items()}


# ----- prefix caching -------------------------------------------------------------------


@pytest.mark.parametrize(("length", "cached"), [(8, 7), (9, 8), (24, 23), (30, 24)])
def test_repeated_prompt_reuses_every_full_block_and_computes_at_least_its_last_token(
        make_core: MakeCore, length: int, cached: int) -> None:
    """A prompt of exactly k blocks hits all k and computes only its last token (for the
    logits); a longer one computes its partial block's tokens."""
    core = make_core()
    tokens = prompt(3, length)
    first = run(core, {"first": tokens}, greedy(6))["first"]
    second = run(core, {"second": tokens}, greedy(6))["second"]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == cached == min(length - 1, length // BLOCK * BLOCK)
    assert second.token_ids == first.token_ids
    assert core.scheduler.kv.pool.stats().num_hit_blocks == length // BLOCK


def test_a_whole_prompt_hit_recomputes_its_last_token_in_a_copy_of_the_shared_block(
        make_core: MakeCore) -> None:
    """The cached last block is copied, never written: its K/V stay bit for bit."""
    core = make_core(num_blocks=16)
    cache = core.runner.kv_cache
    tokens = prompt(3, 3 * BLOCK)
    run(core, {"first": tokens}, greedy(1))
    shared = cache[:, :, 2 * BLOCK:3 * BLOCK].clone()
    again = core.add_request("again", tokens, greedy(4))
    step(core, {})
    assert again.block_ids[:2] == [0, 1] and again.block_ids[2] != 2
    assert (again.num_cached_tokens, again.num_computed_tokens) == (3 * BLOCK - 1, 3 * BLOCK)
    own = again.block_ids[2] * BLOCK
    assert torch.equal(cache[:, :, 2 * BLOCK:3 * BLOCK], shared)
    assert torch.allclose(cache[:, :, own:own + BLOCK], shared, atol=1e-5)
    drain(core)
    assert core.scheduler.kv.pool.lookup(again.block_hashes[2]) == 2


def test_a_whole_prompt_hit_with_no_block_for_the_copy_recomputes_the_last_block(
        make_core: MakeCore) -> None:
    """6 blocks: A's 3 cached, B takes the other 3; C (A's prompt) finds no block for a copy
    of A's last block, so it reuses 2 blocks and computes the third's tokens, as without
    copies."""
    core = make_core(num_blocks=6)
    tokens = prompt(3, 3 * BLOCK)
    first = run(core, {"A": tokens}, greedy(1))["A"]
    results: dict[str, Result] = {}
    core.add_request("B", prompt(4, 3 * BLOCK - 1), greedy(1))
    core.add_request("C", tokens, greedy(1))
    step(core, results)
    assert (results["C"].token_ids, results["C"].num_cached_tokens) == (first.token_ids,
                                                                        2 * BLOCK)
    assert core.scheduler.kv.pool.num_free_blocks == 6


def test_second_run_takes_the_cached_blocks_then_the_free_queue_head(
        make_core: MakeCore) -> None:
    core = make_core(num_blocks=16)
    pool = core.scheduler.kv.pool
    tokens = prompt(3, 30)
    first = core.add_request("first", tokens, greedy(10))
    step(core, {})
    assert first.block_ids == [0, 1, 2, 3]
    drain(core)
    # 39 tokens ran in blocks 0..4; freed tail first, so the prefix is evicted last
    assert pool.free_block_ids() == [*range(5, 16), 4, 3, 2, 1, 0]
    second = core.add_request("second", tokens, greedy(10))
    step(core, {})
    assert second.block_ids == [0, 1, 2, 5]
    assert (second.num_cached_tokens, second.num_computed_tokens) == (24, 30)
    drain(core)
    assert pool.num_free_blocks == 16


def test_prefix_hit_stops_at_the_first_differing_block(make_core: MakeCore) -> None:
    core = make_core()
    base = prompt(4, 30)
    run(core, {"base": base}, greedy(2))
    other = prompt(5, 14)
    assert other[0] != base[16] and other[4] != base[20]
    variants = {
        "two-blocks": base[:16] + other,  # differs from token 16: blocks 0 and 1 match
        "mid-third": base[:20] + other,  # block 2 differs in its second half
        "first-token": [base[0] + 1, *base[1:]],  # chained hashes: nothing matches
    }
    cached = {k: run(core, {k: v}, greedy(2))[k].num_cached_tokens for k, v in variants.items()}
    assert cached == {"two-blocks": 2 * BLOCK, "mid-third": 2 * BLOCK, "first-token": 0}


def test_running_requests_share_prefix_block_ids(make_core: MakeCore) -> None:
    core = make_core()
    pool = core.scheduler.kv.pool
    tokens = prompt(6, 30)
    first = core.add_request("first", tokens, greedy(12))
    results: dict[str, Result] = {}
    step(core, results)  # first's prompt ran: its 3 full blocks are in the prefix index
    second = core.add_request("second", tokens, greedy(12))
    step(core, results)
    running = core.scheduler.requests
    assert running["first"] is first and running["second"] is second
    assert first.block_ids == [0, 1, 2, 3]
    assert second.block_ids == [0, 1, 2, 4]
    assert [pool.ref_count(b) for b in range(5)] == [2, 2, 2, 1, 1]
    drain(core, results)
    assert results["second"].num_cached_tokens == 24
    assert results["second"].token_ids == results["first"].token_ids
    assert pool.num_free_blocks == pool.num_blocks


def test_prompts_admitted_together_compute_twice_and_index_the_older_copy(
        make_core: MakeCore) -> None:
    core = make_core()
    pool = core.scheduler.kv.pool
    tokens = prompt(6, 30)
    a = core.add_request("a", tokens, greedy(4))
    b = core.add_request("b", tokens, greedy(4))
    step(core, {})
    assert (a.block_ids, b.block_ids) == ([0, 1, 2, 3], [4, 5, 6, 7])
    assert [pool.lookup(h) for h in b.block_hashes[:3]] == [0, 1, 2]
    assert [pool.block_hash(b) for b in (4, 5, 6)] == [None, None, None]
    drain(core)
    c = core.add_request("c", tokens, greedy(4))
    step(core, {})
    assert c.block_ids[:3] == [0, 1, 2]
    drain(core)


def test_tenants_never_share_blocks(make_core: MakeCore) -> None:
    core = make_core()
    tokens = prompt(7, 30)
    a = run(core, {"a1": tokens}, greedy(5), tenant="a")["a1"]
    b = run(core, {"b1": tokens}, greedy(5), tenant="b")["b1"]
    default = run(core, {"d1": tokens}, greedy(5))["d1"]
    again = run(core, {"a2": tokens}, greedy(5), tenant="a")["a2"]
    assert [r.num_cached_tokens for r in (a, b, default, again)] == [0, 0, 0, 24]
    assert a.token_ids == b.token_ids == default.token_ids == again.token_ids


# ----- preemption -----------------------------------------------------------------------


def test_preemption_recomputes_to_the_same_tokens(
        make_core: MakeCore, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 requests of 30 + 40 tokens (9 blocks each) in a pool of 12 blocks."""
    prompts = {name: prompt(10 + i, 30) for i, name in enumerate("ABCD")}
    reference = run(make_core(), prompts, greedy(40))
    core = make_core(num_blocks=12)
    schedules = record_schedules(core, monkeypatch)
    requests = [core.add_request(k, v, greedy(40)) for k, v in prompts.items()]
    results = drain(core)
    # step 1 admits A, B, C (4 blocks each; D does not fit); at step 4 A's 33rd token needs a
    # fifth block, so the most recently admitted request, C, gives its blocks back
    assert [s.preempted for s in schedules[:4]] == [(), (), (), ("C",)]
    assert [layout(s) for s in schedules[:1]] == [[("A", 0, 30), ("B", 0, 30), ("C", 0, 30)]]
    assert core.scheduler.num_preemptions == sum(r.num_preemptions for r in requests) > 0
    assert requests[0].num_preemptions == 0  # the oldest request is never the victim
    assert {k: (r.finish_reason, len(r.token_ids)) for k, r in results.items()} == {
        k: ("length", 40) for k in prompts}
    assert {k: r.token_ids for k, r in results.items()} == {
        k: r.token_ids for k, r in reference.items()}
    kv = core.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks == 12
    assert core.scheduler.running == [] and not core.scheduler.waiting


# ----- stop conditions ------------------------------------------------------------------


def test_max_tokens_finishes_with_length(make_core: MakeCore) -> None:
    results = run(make_core(), {"r": prompt(20, 30)}, greedy(7))
    assert (results["r"].finish_reason, len(results["r"].token_ids)) == ("length", 7)
    assert results["r"].num_outputs == 7  # one output per drawn token


def first_new_token(tokens: list[int], after: int) -> int:
    """Index of the first token at or after ``after`` not seen earlier in ``tokens``."""
    return next(i for i in range(after, len(tokens)) if tokens[i] not in tokens[:i])


def test_stop_token_ends_the_output_with_it(make_core: MakeCore) -> None:
    tokens = prompt(0, 30)
    core = make_core()
    full = run(core, {"full": tokens}, greedy(20))["full"].token_ids
    k = first_new_token(full, 3)
    stopped = run(core, {"stop": tokens}, greedy(20, stop_token_ids=[full[k]]))["stop"]
    assert (stopped.finish_reason, stopped.token_ids) == ("stop", full[:k + 1])


def test_model_eos_stops_unless_ignored(make_core: MakeCore) -> None:
    tokens = prompt(0, 30)
    full = run(make_core(), {"full": tokens}, greedy(20))["full"].token_ids
    k = first_new_token(full, 3)
    core = make_core(model={"eos_token_ids": (full[k],)})
    eos = run(core, {"eos": tokens}, greedy(20, ignore_eos=False))["eos"]
    assert (eos.finish_reason, eos.token_ids) == ("stop", full[:k + 1])
    ignored = run(core, {"ignored": tokens}, greedy(20, ignore_eos=True))["ignored"]
    assert (ignored.finish_reason, ignored.token_ids) == ("length", full)


def test_max_model_len_caps_the_output(make_core: MakeCore) -> None:
    core = make_core(max_model_len=40)
    results = run(core, {"r": prompt(22, 30)}, greedy(100))
    assert (results["r"].finish_reason, len(results["r"].token_ids)) == ("length", 10)


def test_pool_size_caps_max_model_len(make_core: MakeCore) -> None:
    core = make_core(num_blocks=12)
    assert core.max_model_len == core.scheduler.max_model_len == 12 * BLOCK
    results = run(core, {"r": prompt(23, 90)}, greedy(100))
    assert (results["r"].finish_reason, len(results["r"].token_ids)) == ("length", 6)


# ----- abort ----------------------------------------------------------------------------


def test_abort_running_and_waiting_requests(make_core: MakeCore) -> None:
    prompts = {name: prompt(30 + i, 30) for i, name in enumerate("ABC")}
    reference = run(make_core(), {"B": prompts["B"]}, greedy(20))["B"]
    core = make_core(max_num_seqs=2)
    requests = {k: core.add_request(k, v, greedy(20)) for k, v in prompts.items()}
    results: dict[str, Result] = {}
    step(core, results)
    step(core, results)
    assert [r.request_id for r in core.scheduler.running] == ["A", "B"]
    assert [r.request_id for r in core.scheduler.waiting] == ["C"]
    aborted = {k: core.abort(k) for k in ("A", "C")}
    assert {k: (o.finish_reason, o.token_ids) for k, o in aborted.items() if o} == {
        "A": ("abort", []), "C": ("abort", [])}
    assert requests["A"].status is requests["C"].status is RequestStatus.FINISHED_ABORTED
    assert requests["A"].block_ids == []
    check_blocks(core)
    assert core.abort("A") is None and core.abort("nobody") is None
    drain(core, results)
    assert results["B"].token_ids == reference.token_ids
    assert len(results["A"].token_ids) == 2 and "C" not in results
    kv = core.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks
    assert core.scheduler.requests == {}


# ----- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "message"), [
    ([], "the prompt is empty"),
    ([5, 256, 7], "token id 256 is outside the vocabulary (0..255)"),
    ([5, -1], "token id -1 is outside the vocabulary (0..255)"),
    (prompt(40, 96), "prompt of 96 tokens does not fit max_model_len 96"),
])
def test_bad_prompt_is_refused_and_the_engine_goes_on(
        make_core: MakeCore, tokens: list[int], message: str) -> None:
    core = make_core(num_blocks=12)
    with pytest.raises(InvalidParamsError) as info:
        core.add_request("bad", tokens, greedy(3))
    assert message in str(info.value)
    assert core.scheduler.requests == {} and not core.has_unfinished()
    results = run(core, {"bad": prompt(41, 95)}, greedy(3))  # the id is still free
    assert (results["bad"].finish_reason, len(results["bad"].token_ids)) == ("length", 1)
    check_blocks(core)


def test_a_stop_token_outside_the_vocabulary_is_refused_and_the_engine_goes_on(
        make_core: MakeCore) -> None:
    """With ``min_tokens`` the sampler masks the stop ids by index: one past the vocabulary
    raised in the step and took every request of the batch down with it."""
    core = make_core(num_blocks=12)
    params = dataclasses.replace(greedy(3), stop_token_ids=(256,), min_tokens=1)
    with pytest.raises(InvalidParamsError, match=r"stop_token_ids 256 is outside"):
        core.add_request("bad", prompt(43, 20), params)
    assert core.reserve("seat", 20, prompt(44, 20)) is not None
    with pytest.raises(InvalidParamsError, match=r"first token -1 is outside"):
        core.commit("seat", prompt(44, 20), -1, 0.0, greedy(3))
    assert core.release("seat")  # the refused commit left the seat to release
    results = run(core, {"good": prompt(45, 20)}, dataclasses.replace(params,
                                                                     stop_token_ids=(7,)))
    assert len(results["good"].token_ids) >= 1
    check_blocks(core)


def test_duplicate_request_id_is_refused_and_the_first_completes(make_core: MakeCore) -> None:
    core = make_core()
    core.add_request("x", prompt(42, 20), greedy(3))
    with pytest.raises(InvalidParamsError, match="request id 'x' is already in use"):
        core.add_request("x", prompt(43, 20), greedy(3))
    results = drain(core)
    assert (results["x"].finish_reason, len(results["x"].token_ids)) == ("length", 3)
    assert run(core, {"x": prompt(43, 20)}, greedy(3))["x"].finish_reason == "length"


# ----- seeded sampling ------------------------------------------------------------------


def test_seeded_sampling_repeats_alone_and_in_a_batch(make_core: MakeCore) -> None:
    tokens = prompt(50, 30)
    seeded = SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True)
    core = make_core()
    alone = run(core, {"s": tokens}, seeded)["s"].token_ids
    again = run(core, {"s": tokens}, seeded)["s"].token_ids  # now with a prefix hit
    batch = make_core()
    core_params = {
        "g": greedy(20), "u": SamplingParams(max_tokens=25, temperature=1.0, ignore_eos=True),
        "o": SamplingParams(max_tokens=20, temperature=0.8, seed=8, ignore_eos=True)}
    for i, (request_id, params) in enumerate(core_params.items()):
        batch.add_request(request_id, prompt(51 + i, 20 + 5 * i), params)
    batch.add_request("s", tokens, seeded)
    batched = drain(batch)
    assert alone == again == batched["s"].token_ids
    other_seed = run(core, {"o": tokens}, SamplingParams(
        max_tokens=20, temperature=0.8, seed=8, ignore_eos=True))["o"].token_ids
    assert other_seed != alone


# ----- request state machine ------------------------------------------------------------

LEGAL = {
    (RequestStatus.WAITING, RequestStatus.RUNNING),
    (RequestStatus.WAITING, RequestStatus.FINISHED_ABORTED),
    (RequestStatus.RUNNING, RequestStatus.WAITING),
    (RequestStatus.RUNNING, RequestStatus.FINISHED_STOPPED),
    (RequestStatus.RUNNING, RequestStatus.FINISHED_LENGTH),
    (RequestStatus.RUNNING, RequestStatus.FINISHED_ABORTED),
}


def new_request(status: RequestStatus = RequestStatus.WAITING) -> Request:
    return Request("r", [5, 6, 7], SamplingParams(), b"salt", status=status)


def test_transition_table_is_the_documented_lifecycle() -> None:
    table = {(src, dst) for src, dsts in TRANSITIONS.items() for dst in dsts}
    assert table == LEGAL
    assert set(TRANSITIONS) == set(RequestStatus)
    assert {s for s in RequestStatus if s.finished} == {
        RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_ABORTED}


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(RequestStatus, repeat=2)))
def test_move_to_allows_legal_moves_only(src: RequestStatus, dst: RequestStatus) -> None:
    request = new_request(src)
    if (src, dst) in LEGAL:
        request.move_to(dst)
        assert request.status is dst
    else:
        with pytest.raises(IllegalTransitionError, match=f"{src} -> {dst}"):
            request.move_to(dst)
        assert request.status is src


def test_a_preempted_request_walks_back_to_running_then_finishes() -> None:
    request = new_request()
    path = [RequestStatus.RUNNING, RequestStatus.WAITING, RequestStatus.RUNNING,
            RequestStatus.FINISHED_LENGTH]
    for status in path:
        request.move_to(status)
    assert request.status.finished and request.status.value == "length"
    with pytest.raises(IllegalTransitionError):
        request.move_to(RequestStatus.FINISHED_ABORTED)  # finished is final, even for abort


def test_request_refuses_an_empty_prompt() -> None:
    with pytest.raises(InvalidParamsError, match="request 'r': the prompt is empty"):
        Request("r", [], SamplingParams(), b"salt")
