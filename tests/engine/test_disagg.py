"""Prefill on one engine, KV written into another's reserved blocks, decode there: the tokens
equal one engine doing it all, over shm and over tcp; blocks are accounted for throughout."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kvcake.common.auth import ClusterAuth
from kvcake.common.errors import AccessDeniedError, InvalidParamsError
from kvcake.engine.config import EngineConfig
from kvcake.engine.core import EngineCore, StepHook
from kvcake.engine.kv import transfer as kv_transfer
from kvcake.engine.kv.transfer import (
    KVSender,
    block_runs,
    block_spans,
    in_flight_s,
    layers_to_send,
    sign_kv_grants,
)
from kvcake.engine.scheduler import SchedulerOutput
from kvcake.transfer import TransferEngine
from kvcake.transfer.batch import Batch
from kvcake.transfer.config import TransferConfig
from kvcake.wire.sampling import SamplingParams
from kvcake.worker.loop import EngineLoop, PrefillSender

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPT = [(7 * i + 3) % 250 + 3 for i in range(70)]  # 4 full blocks of 16 and a tail of 6


def _config(model: Path, **fields: object) -> EngineConfig:
    base = EngineConfig(model=str(model), dtype="float32", kv_cache_bytes=64 << 10,
                        max_num_batched_tokens=32, threads=1)
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


@pytest.fixture
def engines(tiny_model_dir: Callable[..., Path]) -> Iterator[Callable[..., EngineCore]]:
    model = tiny_model_dir()
    transfers: list[TransferEngine] = []

    def make(transport: str = "auto", auth: ClusterAuth | None = None,
             **fields: object) -> EngineCore:
        transfer = TransferEngine(TransferConfig(transport=transport, timeout_s=5.0), auth=auth)
        transfers.append(transfer)
        return EngineCore(_config(model, **fields), transfer=transfer)

    yield make
    for transfer in transfers:
        transfer.close()


def _run(core: EngineCore) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while core.has_unfinished():
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return tokens


def _sender(core: EngineCore) -> KVSender:
    assert core.transfer is not None
    assert core.kv_region is not None and core.kv_segment is not None
    sender = KVSender(core.transfer, core.kv_region, core.kv_segment.view)
    core.step_hook = PrefillSender(sender, core.config.block_size)
    return sender


def _disaggregated(prefill: EngineCore, sender: KVSender, decode: EngineCore,
                   request_id: str, prompt: list[int], granted: bool = True,
                   reuse: bool = False, params: SamplingParams = GREEDY) -> list[int]:
    """``reuse``: the decode side looks the prompt up in its own cache when it reserves,
    and only the blocks it lacks are granted and written."""
    block_ids = decode.reserve(request_id, len(prompt), prompt if reuse else ())
    assert block_ids is not None and decode.kv_region is not None
    assert decode.transfer is not None
    cached = decode.num_reserved_cached(request_id)
    grants = sign_kv_grants(decode.transfer, decode.kv_region, block_ids[cached:], 30.0) \
        if granted else []
    sender.open(request_id, sender.target(decode.kv_region, block_ids, grants, cached))
    prefill.add_request(request_id, prompt, dataclasses.replace(params, max_tokens=1))
    first = _run(prefill)[request_id]
    sender.wait(request_id, 5.0)
    decode.commit(request_id, prompt, first[0], 0.0, params)
    decode.check_integrity()
    return first + _run(decode)[request_id]


def test_a_seeded_request_draws_the_same_tokens_disaggregated(
        engines: Callable[..., EngineCore]) -> None:
    """The decode side's generator starts past the prefill's draw of the first token."""
    seeded = SamplingParams(max_tokens=12, temperature=1.5, seed=11, ignore_eos=True)
    colocated = engines()
    colocated.add_request("r", PROMPT, seeded)
    expected = _run(colocated)["r"]
    prefill, decode = engines(), engines(kv_cache_bytes=96 << 10)
    assert _disaggregated(prefill, _sender(prefill), decode, "r", PROMPT,
                          params=seeded) == expected


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_disaggregated_equals_colocated(engines: Callable[..., EngineCore],
                                        transport: str) -> None:
    colocated = engines()
    colocated.add_request("r", PROMPT, GREEDY)
    expected = _run(colocated)["r"]
    # the decode pool is laid out differently (bigger) so the block ids differ on each side
    prefill, decode = engines(transport), engines(transport, kv_cache_bytes=96 << 10)
    sender = _sender(prefill)
    assert _disaggregated(prefill, sender, decode, "r", PROMPT) == expected
    # the sender counts what it moved: every layer's K and V of the prompt's blocks
    region = prefill.kv_region
    assert region is not None
    blocks = -(-len(PROMPT) // region.block_size)
    assert (sender.num_sent, sender.num_bytes_sent) == (
        1, blocks * region.block_size * region.slot_bytes * 2 * region.num_layers)
    assert sender.writing_s > 0
    decode.check_integrity()
    prefill.check_integrity()
    assert decode.scheduler.kv.num_free_blocks == decode.scheduler.kv.num_blocks


class _LastLayerWatch:
    """Wraps a prefill's step hook: when the last layer of a step is computed (the step not
    yet over), waits for what was sent so far and records which of the prompt's blocks hold
    the prefill's K/V on the decode side, per layer."""

    def __init__(self, hook: StepHook, sender: KVSender, prefill: EngineCore,
                 decode: EngineCore, request_id: str, decode_blocks: list[int]) -> None:
        self.hook, self.sender, self.request_id = hook, sender, request_id
        self.prefill, self.decode, self.decode_blocks = prefill, decode, decode_blocks
        self.landed: list[list[bool]] = []  # per step: per layer, every computed block equal

    def before_execute(self, output: SchedulerOutput) -> None:
        self.hook.before_execute(output)
        self._output = output

    def after_layer(self, layer: int) -> None:
        num_layers = self.prefill.runner.kv_cache.shape[0]
        if layer == num_layers - 1:
            self.sender.drain(self.request_id)
            self.landed.append([self._layer_landed(i) for i in range(num_layers)])
        self.hook.after_layer(layer)

    def _layer_landed(self, layer: int) -> bool:
        """Whether the K/V of every token of this step's chunk are on the decode side."""
        chunk = next(c for c in self._output.chunks if c.request.request_id == self.request_id)
        size = self.prefill.config.block_size
        positions = range(chunk.start, chunk.start + chunk.num_tokens)
        ours = [chunk.request.block_ids[p // size] * size + p % size for p in positions]
        theirs = [self.decode_blocks[p // size] * size + p % size for p in positions]
        return torch.equal(self.prefill.runner.kv_cache[layer][:, ours],
                           self.decode.runner.kv_cache[layer][:, theirs])

    def after_execute(self, output: SchedulerOutput) -> None:
        self.hook.after_execute(output)


@pytest.mark.parametrize("by_layer", [True, False])
def test_over_the_network_a_step_s_blocks_go_out_layer_by_layer(
        engines: Callable[..., EngineCore], by_layer: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before a step's last layer is computed, every earlier layer of the blocks it
    completes has landed in the decode instance's cache: the writes overlap the step
    instead of waiting for its end (turned off: nothing of the step has landed then). The
    answer equals one engine's either way. (The tiny model's layers are a few KiB: every
    one is worth a send here.)"""
    monkeypatch.setattr(kv_transfer, "MIN_LAYERED_SEND_BYTES", 1)
    colocated = engines()
    colocated.add_request("r", PROMPT, GREEDY)
    expected = _run(colocated)["r"]
    prefill, decode = engines("tcp"), engines("tcp", kv_cache_bytes=96 << 10)
    sender = _sender(prefill)
    assert isinstance(prefill.step_hook, PrefillSender)
    prefill.step_hook.by_layer = by_layer
    block_ids = decode.reserve("r", len(PROMPT))
    assert block_ids is not None and decode.kv_region is not None and prefill.step_hook
    watch = _LastLayerWatch(prefill.step_hook, sender, prefill, decode, "r", block_ids)
    prefill.step_hook = watch
    sender.open("r", sender.target(decode.kv_region, block_ids))
    prefill.add_request("r", PROMPT, dataclasses.replace(GREEDY, max_tokens=1))
    first = _run(prefill)["r"]
    sender.wait("r", 5.0)
    decode.commit("r", PROMPT, first[0], 0.0, GREEDY)
    assert first + _run(decode)["r"] == expected
    # 70 tokens in chunks of 32 (two whole blocks each, then the tail): three steps; each
    # time every layer but the one just computed had landed
    assert watch.landed == [[by_layer, False]] * 3
    assert (sender.num_sent, sender.num_sent_by_layer) == (1, int(by_layer))


def test_layers_go_out_in_groups_worth_a_send_and_same_host_copies_in_one(
        engines: Callable[..., EngineCore], monkeypatch: pytest.MonkeyPatch) -> None:
    prefill, decode = engines("tcp"), engines("tcp", kv_cache_bytes=96 << 10)
    sender = _sender(prefill)
    assert decode.kv_region is not None and prefill.kv_region is not None
    sender.open("r", sender.target(decode.kv_region, list(range(4))))
    region = prefill.kv_region
    per_layer = 2 * region.block_size * region.slot_bytes  # a block's K and V of one layer
    monkeypatch.setattr(kv_transfer, "MIN_LAYERED_SEND_BYTES", 3 * per_layer)
    assert [sender.layer_group("r", n) for n in (1, 2, 3, 4)] == [2, 2, 1, 1]  # of 2 layers
    for group in (1, 2, 3, 7):  # each layer in exactly one group, in order
        ends, sent = [], 0
        for layer in range(7):
            layers = layers_to_send(sent, layer, group, 7)
            ends.append(layers)
            sent = layers.stop if layers else sent
        assert [i for layers in ends if layers for i in layers] == list(range(7))
    same_host = _sender(engines("shm"))
    same_host.open("s", same_host.target(decode.kv_region, list(range(4))))
    assert same_host.layer_group("s", 4) == region.num_layers


TOKEN = "disagg-token-" + "k" * 24


def test_a_decode_instance_receives_only_the_blocks_it_does_not_hold(
        engines: Callable[..., EngineCore]) -> None:
    """A second turn extends the first one's prompt: the decode instance finds the first
    prompt's 4 full blocks in its own cache, the prefill writes the other 3 (under grants
    for those 3 only), and the answer equals one engine's."""
    second = PROMPT + [(5 * i + 1) % 250 + 3 for i in range(30)]  # 100 tokens: 7 blocks
    colocated = engines()
    colocated.add_request("r2", second, GREEDY)
    expected = _run(colocated)["r2"]
    prefill = engines("tcp", ClusterAuth(TOKEN))
    decode = engines("tcp", ClusterAuth(TOKEN), kv_cache_bytes=96 << 10)
    sender = _sender(prefill)
    _disaggregated(prefill, sender, decode, "r1", PROMPT, reuse=True)
    first_bytes = sender.num_bytes_sent  # 5 blocks: nothing was cached on the decode side
    assert _disaggregated(prefill, sender, decode, "r2", second, reuse=True) == expected
    assert sender.num_bytes_sent - first_bytes == first_bytes * 3 // 5
    assert decode.scheduler.kv.num_free_blocks == decode.scheduler.kv.num_blocks
    decode.check_integrity()


def test_a_reservation_that_cannot_fit_its_rest_keeps_nothing(
        engines: Callable[..., EngineCore]) -> None:
    decode = engines(kv_cache_bytes=96 << 10)
    prefill = engines()
    _disaggregated(prefill, _sender(prefill), decode, "r1", PROMPT, reuse=True)
    total = decode.scheduler.kv.num_blocks
    hog = decode.reserve("hog", (total - 5) * 16)  # leaves the 5 blocks r1 cached, and 0 more
    assert hog is not None and decode.num_reserved_cached("hog") == 0
    assert decode.reserve("r2", len(PROMPT) + 40, PROMPT + [9] * 40) is None
    assert decode.num_reserved_cached("r2") == 0
    decode.release("hog")
    assert decode.scheduler.kv.num_free_blocks == total
    decode.check_integrity()
    with pytest.raises(InvalidParamsError, match="3 prompt tokens given for a prompt of 4"):
        decode.reserve("bad", 4, [1, 2, 3])


def test_with_a_cluster_token_kv_moves_under_the_decode_instance_s_grants(
        engines: Callable[..., EngineCore]) -> None:
    colocated = engines()
    colocated.add_request("r", PROMPT, GREEDY)
    expected = _run(colocated)["r"]
    prefill = engines("tcp", ClusterAuth(TOKEN))
    decode = engines("tcp", ClusterAuth(TOKEN), kv_cache_bytes=96 << 10)
    decode.reserve("busy", 20)  # later reservations do not start at block 0
    assert _disaggregated(prefill, _sender(prefill), decode, "r", PROMPT) == expected


def test_kv_writes_without_the_decode_instance_s_grants_are_refused(
        engines: Callable[..., EngineCore]) -> None:
    prefill, decode = engines("tcp", ClusterAuth(TOKEN)), engines("tcp", ClusterAuth(TOKEN))
    assert decode.kv_segment is not None
    before = bytes(decode.kv_segment.view)
    with pytest.raises(AccessDeniedError, match="no live grant"):
        _disaggregated(prefill, _sender(prefill), decode, "r", PROMPT, granted=False)
    assert bytes(decode.kv_segment.view) == before


def test_block_spans_and_one_grant_per_span(engines: Callable[..., EngineCore]) -> None:
    assert block_spans([3, 4, 5, 9, 2, 3]) == [(3, 3), (9, 1), (2, 2)]
    secured, plain = engines("tcp", ClusterAuth(TOKEN)), engines("tcp", ClusterAuth())
    assert secured.transfer is not None and secured.kv_region is not None
    assert plain.transfer is not None
    assert len(sign_kv_grants(secured.transfer, secured.kv_region, [0, 1, 3], 30.0)) == 2
    assert sign_kv_grants(plain.transfer, secured.kv_region, [0, 1], 30.0) == []
    sender = KVSender(secured.transfer, secured.kv_region, memoryview(bytearray(1)))
    with pytest.raises(InvalidParamsError, match="1 grants for 2 runs"):
        sender.target(secured.kv_region, [0, 3], [b"only-one"])


def test_second_request_reuses_the_prefill_cache(engines: Callable[..., EngineCore]) -> None:
    prefill, decode = engines(), engines()
    sender = _sender(prefill)
    first = _disaggregated(prefill, sender, decode, "a", PROMPT)
    second = _disaggregated(prefill, sender, decode, "b", PROMPT)
    assert first == second
    assert prefill.scheduler.kv.pool.stats().num_hit_blocks == len(PROMPT) // 16
    # the committed prompt's full blocks are now cached on the decode side too
    assert decode.scheduler.kv.pool.num_cached_blocks >= len(PROMPT) // 16


def test_reservations_are_released_and_checked(engines: Callable[..., EngineCore]) -> None:
    decode = engines()
    total = decode.scheduler.kv.num_blocks
    block_ids = decode.reserve("x", 40)
    assert block_ids is not None and len(block_ids) == 3
    decode.check_integrity()
    assert decode.num_reserved == 1
    with pytest.raises(InvalidParamsError, match="already in use"):
        decode.reserve("x", 40)
    with pytest.raises(InvalidParamsError, match="70 prompt tokens for 3 reserved"):
        decode.commit("x", PROMPT[:70], 5, 0.0, GREEDY)
    assert decode.release("x") and not decode.release("x")
    assert decode.scheduler.kv.num_free_blocks == total
    with pytest.raises(InvalidParamsError, match="no reserved blocks"):
        decode.commit("never", PROMPT, 5, 0.0, GREEDY)


def test_reserve_refuses_when_full(engines: Callable[..., EngineCore]) -> None:
    decode = engines()
    total = decode.scheduler.kv.num_blocks
    assert decode.reserve("a", (total - 1) * 16) is not None
    assert decode.reserve("b", 2 * 16) is None  # only one block left
    decode.check_integrity()


def _batch(submitted_s: float, finished_s: float) -> Batch:
    batch = Batch([])
    batch.submitted_s, batch.finished_s = submitted_s, finished_s
    return batch


def test_in_flight_time_counts_overlapping_writes_once() -> None:
    # two chunks' writes overlap in 1..2; a third runs alone after compute in 2..4
    batches = [_batch(1.0, 2.0), _batch(0.0, 1.5), _batch(4.0, 4.5)]
    assert in_flight_s(batches) == 2.5
    assert in_flight_s([]) == 0.0


def test_block_runs_coalesce_consecutive_pairs() -> None:
    assert block_runs([7, 8, 9, 12], [3, 4, 5, 6]) == [(7, 3, 3), (12, 6, 1)]
    assert block_runs([1, 2], [5, 4]) == [(1, 5, 1), (2, 4, 1)]
    assert block_runs([], []) == []
    with pytest.raises(InvalidParamsError, match="2 source blocks for 1"):
        block_runs([1, 2], [3])


def test_sender_refuses_another_layout(engines: Callable[..., EngineCore]) -> None:
    prefill, other = engines(), engines(block_size=32)
    assert other.kv_region is not None
    with pytest.raises(InvalidParamsError, match="fingerprint"):
        _sender(prefill).target(other.kv_region, [0])


def test_engine_loop_frees_a_reservation_nobody_commits(
        engines: Callable[..., EngineCore]) -> None:
    decode = engines()
    outputs: list[object] = []
    loop = EngineLoop(decode, None, outputs.append, lambda *a: outputs.append(a),
                      reserve_timeout_s=0.2, transfer_timeout_s=1.0)
    loop.start()
    try:
        assert loop.call(lambda: loop.reserve("lost", 40)).result(5) is not None
        assert loop.call(lambda: decode.num_reserved).result(5) == 1
        deadline = time.monotonic() + 5
        while loop.call(lambda: decode.num_reserved).result(5) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loop.call(lambda: decode.num_reserved).result(5) == 0
        loop.call(decode.check_integrity).result(5)
        assert decode.scheduler.kv.num_free_blocks == decode.scheduler.kv.num_blocks
    finally:
        loop.stop()
    assert outputs == []


def test_a_reservation_is_held_for_the_prefill_the_conductor_expects(
        engines: Callable[..., EngineCore]) -> None:
    """A long prefill queue must not outlive its decode seat: ``hold_s`` (the Conductor's
    predicted TTFT, with slack) extends the base timeout for that reservation only."""
    decode = engines()
    loop = EngineLoop(decode, None, lambda _: None, lambda *_: None,
                      reserve_timeout_s=0.2, transfer_timeout_s=1.0)
    loop.start()
    try:
        assert loop.call(lambda: loop.reserve("held", 40, hold_s=3600.0)).result(5)
        assert loop.call(lambda: loop.reserve("lost", 40)).result(5) is not None
        deadline = time.monotonic() + 5
        while loop.call(lambda: decode.num_reserved).result(5) == 2:
            assert time.monotonic() < deadline, "the plain reservation never lapsed"
            time.sleep(0.05)
        assert loop.call(lambda: decode.release("held")).result(5)  # still there to release
        assert not loop.call(lambda: decode.release("lost")).result(5)
    finally:
        loop.stop()


def test_reserve_waits_while_the_batch_is_full(engines: Callable[..., EngineCore]) -> None:
    decode = engines(max_num_seqs=2)
    assert decode.reserve("a", 20) is not None
    assert decode.reserve("b", 20) is not None
    assert decode.reserve("c", 20) is None  # two requests hold the batch's two seats
    assert decode.release("a")
    assert decode.reserve("c", 20) is not None
    decode.check_integrity()


def test_decodes_of_very_different_lengths_batch_exactly(
        engines: Callable[..., EngineCore]) -> None:
    """Decodes are grouped by context length (each group padded to its own longest), and a
    batch of them draws what each draws alone."""
    prompts = {"short": PROMPT[:20], "long": (PROMPT * 5)[:330], "mid": PROMPT[:45]}
    together = engines(kv_cache_bytes=256 << 10, max_num_batched_tokens=512)
    for request_id, prompt in prompts.items():
        together.add_request(request_id, prompt, GREEDY)
    batched = _run(together)
    for request_id, prompt in prompts.items():
        alone = engines(kv_cache_bytes=256 << 10, max_num_batched_tokens=512)
        alone.add_request(request_id, prompt, GREEDY)
        assert _run(alone)[request_id] == batched[request_id]


def test_length_groups_bound_the_padding() -> None:
    from kvcake.engine.runner import _length_groups
    from kvcake.engine.scheduler import ScheduledChunk

    def chunk(context: int) -> ScheduledChunk:
        return ScheduledChunk(None, context - 1, 1)  # type: ignore[arg-type]

    contexts = [90, 130, 200, 250, 900, 1400, 3800]
    groups = _length_groups([chunk(c) for c in contexts])
    assert [[c.start + 1 for c in g] for g in groups] == [[90, 130, 200, 250], [900, 1400],
                                                          [3800]]
