"""P/D bookkeeping of kvcake's vLLM connector (no vLLM): what a prefill writes after each step,
when a decode request may run, and the parameters that carry both."""

from __future__ import annotations

import json

import pytest

from kvcake.common.errors import InvalidParamsError
from kvcake.transfer.segment import SegmentDescriptor
from kvcake.vllm.openai import check_params, chunk_output, completion_body
from kvcake.vllm.pd import (
    DecodeWait,
    PdPlan,
    PrefillTarget,
    decode_params,
    pd_params,
    prefill_params,
)
from kvcake.wire.kv import KVRegion
from kvcake.wire.sampling import SamplingParams

BLOCK = 128


def _region(num_blocks: int = 10, layers: int = 3, layer_block: int = 4096) -> KVRegion:
    descriptor = SegmentDescriptor("kv-d", 1, layers * num_blocks * layer_block, "host",
                                   "127.0.0.1:1", "", 0)
    return KVRegion(descriptor, "fp", layers, num_blocks * BLOCK, layer_block // BLOCK, BLOCK,
                    block_stride=layer_block, layer_stride=num_blocks * layer_block,
                    control="127.0.0.1:2")


def test_params_round_trip_through_json() -> None:
    target = PrefillTarget("req-1", _region(), [4, 5, 9], [b"\x01\x02"])
    assert pd_params(json.loads(json.dumps(prefill_params(target)))) == target
    assert pd_params(decode_params("req-2")) == DecodeWait("req-2")
    assert pd_params(None) is None
    assert pd_params({"other": 1}) is None


@pytest.mark.parametrize("entry", [{"role": "middle"}, {"role": "decode"}, "decode",
                                   {"role": "prefill", "key": "k", "block_ids": "x"}])
def test_bad_params_are_refused_by_name(entry: object) -> None:
    with pytest.raises(InvalidParamsError, match=r"kv_transfer_params\.kvcake"):
        pd_params({"kvcake": entry})


def test_prefill_writes_each_block_once_it_is_full_and_the_partial_last_one_at_the_end() -> None:
    plan = PdPlan(BLOCK)
    # 600 tokens: 5 blocks; the decode instance caches the first 2 and reserved 3 blocks
    plan.prefill("p", PrefillTarget("k", _region(), [7, 8, 9]), 600)
    own = [20, 21, 22, 23, 24]
    assert plan.sends("p", 256, own[:2]) is None  # blocks 0-1: the decode side has them
    first = plan.sends("p", 512, own[:4])
    assert first is not None and (first.src, first.dst, first.last) == ((22, 23), (7, 8), False)
    last = plan.sends("p", 600, own)
    assert last is not None and (last.src, last.dst, last.last) == ((24,), (9,), True)
    assert plan.sends("p", 600, own) is None  # done: nothing twice


def test_a_prefill_with_nothing_left_to_write_still_says_it_is_done() -> None:
    plan = PdPlan(BLOCK)
    plan.prefill("p", PrefillTarget("k", _region(), []), 200)
    send = plan.sends("p", 200, [3, 4])
    assert send is not None and send.last and send.src == () and send.dst == ()


def test_more_target_blocks_than_the_prompt_has_are_refused() -> None:
    with pytest.raises(InvalidParamsError, match="3 target blocks for a prompt of 2"):
        PdPlan(BLOCK).prefill("p", PrefillTarget("k", _region(), [1, 2, 3]), 200)


def test_decode_runs_once_allocated_and_told() -> None:
    plan = PdPlan(BLOCK)
    plan.wait("vllm-7", "k")
    assert plan.blocks_of("k") is None
    assert plan.allocated("vllm-7", [30, 31, 32, 33], 256) == ("k", (32, 33))
    assert plan.blocks_of("k") == (32, 33)
    assert plan.take_arrivals() == []
    assert plan.arrived("k", ok=False)
    [arrival] = plan.take_arrivals()
    assert (arrival.request_id, arrival.ok, arrival.block_ids) == ("vllm-7", False, (32, 33))
    assert not plan.arrived("k", ok=True)  # told twice: the second finds nobody
    assert not plan.waits("vllm-7")


def test_a_decode_request_waits_for_its_prefill_once() -> None:
    plan = PdPlan(BLOCK)
    plan.wait("vllm-8", "k")
    assert not plan.waited("vllm-8")  # no blocks yet: vLLM may ask again, and it waits
    plan.allocated("vllm-8", [30, 31], 0)
    assert plan.arrived("k", ok=False)  # the write failed: vLLM frees its blocks and
    assert plan.waited("vllm-8")  # admits it again; it computes its prompt itself then
    plan.finished("vllm-8")
    assert not plan.waited("vllm-8")


def test_prompt_log_probabilities_are_refused_by_name() -> None:
    check_params(SamplingParams(max_tokens=4, logprobs=1))
    with pytest.raises(InvalidParamsError, match="prompt log-probabilities"):
        check_params(SamplingParams(max_tokens=4, logprobs=0, prompt_logprobs=0))


def test_a_finished_or_forgotten_decode_request_leaves_nothing() -> None:
    plan = PdPlan(BLOCK)
    plan.wait("a", "ka")
    plan.wait("b", "kb")
    plan.finished("a")
    plan.forget("kb")
    plan.finished("b")
    assert not plan.waits("a") and not plan.waits("b")
    assert not plan.arrived("ka", ok=True) and not plan.arrived("kb", ok=True)
    assert plan.allocated("b", [1, 2], 0) is None and plan.take_arrivals() == []


def test_a_request_forgotten_before_vllm_gives_it_blocks_gets_its_word_with_them() -> None:
    """The sidecar's Forget can land between vLLM's lookup (the request waits) and its
    allocation: the blocks then come back as a failed load at once, not held for good."""
    plan = PdPlan(BLOCK)
    plan.wait("r", "k")
    plan.forget("k", now=10.0, grace_s=5.0)
    assert plan.waits("r")  # vLLM's allocation still goes to the plan
    assert plan.allocated("r", [7, 8], 0) is None  # no prefill to wake
    [arrival] = plan.take_arrivals()
    assert (arrival.request_id, arrival.ok, arrival.block_ids, arrival.ended) == (
        "r", False, (7, 8), False)
    assert plan.waited("r") and not plan.arrived("k", ok=True)
    # vLLM may look it up again before its abort lands: it waits again, and leaves nothing
    plan.wait("s", "k2")
    plan.forget("k2")
    plan.wait("s", "k2")
    assert plan.allocated("s", [9], 0) is None and plan.num_waiting() == 0


def test_a_request_asked_again_under_a_key_before_the_first_ones_forget_replaces_it() -> None:
    """The retry waits under the key; the first request is forgotten then and there (its
    blocks held for the grace, as any abandoned request's), and a late Forget or vLLM's
    allocation of the first finds nothing of the retry's to drop."""
    plan = PdPlan(BLOCK)
    plan.wait("r", "k")
    plan.allocated("r", [1, 2], 0)
    plan.wait("s", "k", now=10.0, grace_s=5.0)  # r's Forget has not come yet
    assert plan.waits("s") and not plan.waits("r")
    plan.allocated("s", [3, 4], 0)
    plan.finished("r", now=11.0, grace_s=5.0)  # vLLM ends r: s still waits
    assert plan.waits("s") and plan.blocks_of("k") == (3, 4)
    assert plan.arrived("k", ok=True)
    arrivals = {(a.request_id, a.ok, a.block_ids, a.ended) for a in plan.take_arrivals()}
    assert arrivals == {("r", False, (1, 2), True), ("s", True, (3, 4), False)}
    # not yet allocated when the retry came: r's blocks come back as a failed load
    plan.wait("t", "k3")
    plan.wait("u", "k3")
    plan.forget("k3")  # u's, this time
    assert plan.allocated("t", [5], 0) is None  # no KeyError, nothing left waiting
    assert [(a.request_id, a.ok) for a in plan.take_arrivals()] == [("t", False)]
    assert plan.allocated("u", [6], 0) is None and plan.num_waiting() == 0


def test_vllm_layout_ranges_and_grants_cover_every_layer_of_a_run() -> None:
    region = _region(num_blocks=10, layers=3, layer_block=4096)
    ranges = region.block_ranges(2, 3)
    assert ranges == [(layer * 40960 + 2 * 4096, 3 * 4096) for layer in range(3)]
    offset, length, stride, repeat = region.grant_shape(2, 3)
    for start, size in ranges:  # every write lies inside the grant's ranges
        index = (start - offset) // stride
        assert 0 <= index < repeat and start + size <= offset + index * stride + length


def test_kvcake_layout_is_unchanged() -> None:
    descriptor = SegmentDescriptor("kv", 1, 1 << 20, "host", "127.0.0.1:1", "", 0)
    region = KVRegion(descriptor, "fp", 2, 64, 32, 16)
    assert region.block_ranges(1, 2) == [(region.offset(layer, kv, 16), 2 * 16 * 32)
                                         for layer in range(2) for kv in (0, 1)]
    assert region.grant_shape(1, 2) == (16 * 32, 2 * 16 * 32, 64 * 32, 4)


def test_completion_body_and_chunks() -> None:
    params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=1, seed=3,
                            stop=("never sent",), stop_token_ids=(2,))
    body = completion_body("smollm2", [1, 2, 3], params, stream=True,
                           kv_transfer_params=decode_params("k"))
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 5 and "stop" not in body
    assert body["stop_token_ids"] == [2] and body["seed"] == 3 and body["logprobs"] == 1
    assert body["kv_transfer_params"] == {"kvcake": {"role": "decode", "key": "k"}}
    chunk = {"choices": [{"token_ids": [42], "finish_reason": None, "logprobs": {
        "token_logprobs": [-0.5], "top_logprobs": [{"token_id:42": -0.5, "token_id:7": -1.5}]}}],
        "usage": {"prompt_tokens_details": {"cached_tokens": 128}}}
    output = chunk_output("r", chunk, 3)
    assert output is not None
    assert (output.token_ids, output.logprobs, output.top_logprobs, output.num_cached_tokens) \
        == ([42], [-0.5], [[(42, -0.5), (7, -1.5)]], 128)
    assert chunk_output("r", {"choices": [], "usage": {}}, 3) is None
    end = chunk_output("r", {"choices": [{"token_ids": [], "finish_reason": "length"}]}, 3)
    assert end is not None and end.finish_reason == "length" and end.token_ids == []


def test_an_abandoned_decode_request_frees_its_blocks_on_the_prefills_word_or_after_grace(
        ) -> None:
    plan = PdPlan(BLOCK)
    for request_id, key in (("r1", "k1"), ("r2", "k2"), ("r3", "k3")):
        plan.wait(request_id, key)
        plan.allocated(request_id, [1, 2], 0)
    plan.finished("r1", now=10.0, grace_s=5.0)  # vLLM aborted it while it waited
    plan.forget("k2", now=10.0, grace_s=5.0)  # the Conductor released it
    assert plan.take_arrivals(now=12.0) == [] and plan.num_waiting() == 3
    assert not plan.arrived("k1", ok=True)  # the prefill stopped writing: r1's blocks go
    [early] = plan.take_arrivals(now=12.0)
    assert (early.request_id, early.ended) == ("r1", True)
    [late] = plan.take_arrivals(now=15.0)  # r2's prefill never said: its grace ended
    assert (late.request_id, late.ended, late.block_ids) == ("r2", True, (1, 2))
    assert plan.num_waiting() == 1 and plan.waits("r3")


def test_a_reservation_asked_again_under_its_key_gets_the_prefills_word() -> None:
    """The first try's seat timed out (abandoned, its blocks held); the retry waits under the
    same key and its blocks went to the prefill: the word ends both."""
    plan = PdPlan(BLOCK)
    plan.wait("try-1", "k")
    plan.allocated("try-1", [1, 2], 0)
    plan.forget("k", now=10.0, grace_s=5.0)
    plan.wait("try-2", "k")
    plan.allocated("try-2", [3, 4], 0)
    assert plan.arrived("k", ok=True)
    arrivals = {(a.request_id, a.ok, a.block_ids, a.ended) for a in plan.take_arrivals()}
    assert arrivals == {("try-1", False, (1, 2), True), ("try-2", True, (3, 4), False)}
    assert plan.num_waiting() == 0


def test_a_preempted_prefill_resumes_its_writes_where_they_stopped() -> None:
    plan = PdPlan(BLOCK)
    target = PrefillTarget("k", _region(), [7, 8, 9])
    plan.prefill("p", target, 384)
    first = plan.sends("p", 256, [20, 21])
    assert first is not None and first.dst == (7, 8)
    plan.prefill("p", target, 384)  # preempted, admitted again: computes from the start
    assert plan.sends("p", 256, [30, 31]) is None  # blocks 0-1 are in the target already
    last = plan.sends("p", 384, [30, 31, 32])
    assert last is not None and (last.src, last.dst, last.last) == ((32,), (9,), True)
