"""KV blocks through a real store (master and node processes): the stored layout, a round trip
that reproduces recomputation, and blocks that are corrupt, foreign or unreachable."""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from kvcake.engine.config import EngineConfig
from kvcake.engine.core import EngineCore
from kvcake.engine.kv.blocks import BlockBytes, LayeredCopy, paged_layers
from kvcake.engine.kv.format import HEADER_BYTES, BlockLayout, checksum, payload_digest
from kvcake.ops import start_master, start_node
from kvcake.wire.output import TokenOutput
from kvcake.wire.sampling import SamplingParams

BLOCK = 8
PROMPT = [(i * 37 + 11) % 250 + 3 for i in range(64)]  # 8 full blocks
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LAYOUT = BlockLayout("float32", 2, 2, 16, BLOCK, "0123456789abcdef")


# -- the stored layout -----------------------------------------------------------------------


def _record(layout: BlockLayout, block_hash: bytes, fill: float = 0.5) -> bytearray:
    payload = torch.full((layout.payload_bytes // 4,), fill, dtype=torch.float32)
    view = memoryview(payload.numpy()).cast("B")
    return bytearray(layout.pack_header(block_hash, [view])) + bytearray(view)


def test_layout_accepts_its_own_record() -> None:
    assert LAYOUT.check(memoryview(_record(LAYOUT, b"h" * 32)), b"h" * 32) is None
    assert LAYOUT.record_bytes == HEADER_BYTES + 2 * 2 * BLOCK * 2 * 16 * 4


@pytest.mark.parametrize(("field", "other"), [
    ("fingerprint", replace(LAYOUT, fingerprint="fedcba9876543210")),
    ("num_layers", replace(LAYOUT, block_size=BLOCK * 2, num_layers=1)),
    ("num_kv_heads", replace(LAYOUT, num_kv_heads=1, head_dim=32)),
    ("dtype", replace(LAYOUT, dtype="bfloat16", num_layers=4)),
])
def test_layout_refuses_a_foreign_record(field: str, other: BlockLayout) -> None:
    """The first header field (in layout order) that differs is named."""
    assert other.payload_bytes == LAYOUT.payload_bytes  # same size: only the header differs
    problem = LAYOUT.check(memoryview(_record(other, b"h" * 32)), b"h" * 32)
    assert problem is not None and problem.startswith(field)


def test_layout_detects_corruption_and_wrong_keys() -> None:
    record = _record(LAYOUT, b"h" * 32)
    assert LAYOUT.check(memoryview(record), b"x" * 32) == (
        f"block_hash is {b'h' * 32!r}, expected {b'x' * 32!r}")
    record[HEADER_BYTES + 100] ^= 0x01
    assert LAYOUT.check(memoryview(record), b"h" * 32) == "payload checksum mismatch"
    assert "size" in str(LAYOUT.check(memoryview(record)[:-4], b"h" * 32))
    record[0:4] = b"XXXX"
    assert str(LAYOUT.check(memoryview(record), b"h" * 32)).startswith("magic")


def test_a_block_checks_the_same_whole_or_in_pieces() -> None:
    """A block read straight into a paged cache arrives in pieces (a run per layer)."""
    record = memoryview(_record(LAYOUT, b"h" * 32))
    header, payload = record[:HEADER_BYTES], record[HEADER_BYTES:]
    pieces = [payload[i:i + 1000] for i in range(0, payload.nbytes, 1000)]
    assert LAYOUT.pack_header(b"h" * 32, pieces) == bytes(header)
    assert LAYOUT.check_parts(header, pieces, b"h" * 32) is None
    assert LAYOUT.check_parts(header, pieces[:-1], b"h" * 32) == (
        f"payload pieces hold {payload.nbytes - pieces[-1].nbytes} bytes")
    old = bytearray(record)
    old[4:6] = (1).to_bytes(2, "little")  # a version 1 (CRC32) record
    assert LAYOUT.check(memoryview(old), b"h" * 32) == "version is 1, expected 2"


@pytest.mark.parametrize("shape", [(6, 2, BLOCK, 2, 16), (2, 6, BLOCK, 2, 16)])
def test_block_bytes_are_each_layer_s_slice_in_element_order(shape: tuple[int, ...]) -> None:
    """Block-major layers (vLLM-CPU's) give one run a layer; kvcake's (K and V apart) two."""
    cache = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)
    layers = [cache] * 2 if shape[0] == 6 else [cache.transpose(0, 1)] * 2
    views = BlockBytes(layers).views(3)
    assert len(views) == (2 if shape[0] == 6 else 4)
    assert b"".join(views) == b"".join(
        layer[3].contiguous().numpy().tobytes() for layer in layers)


@pytest.mark.parametrize("layout", ["one tensor", "a tensor a layer"])
def test_a_block_copies_in_and_out_in_record_order(layout: str) -> None:
    """Layers as evenly spaced views of one tensor (kvcake's cache, vLLM-CPU's: out in one
    strided copy) and a tensor a layer (run by run) give the same record bytes."""
    if layout == "one tensor":
        layers = paged_layers(torch.zeros(3, 2, 4 * BLOCK, 2, 16), BLOCK)
    else:
        layers = [torch.zeros(4, 2, BLOCK, 2, 16) for _ in range(3)]
    blocks = BlockBytes(layers)
    assert blocks.small_runs == (layout == "one tensor")  # K and V apart: runs of 1 KiB
    payload = torch.randn(3, 2, BLOCK, 2, 16)
    blocks.copy_in(2, memoryview(payload.numpy()).cast("B"))
    digest = payload_digest()  # hashed run by run as it is copied: the whole payload's
    blocks.memmove_in(1, memoryview(payload.numpy()).cast("B"), digest)
    assert digest.intdigest() == checksum([memoryview(payload.numpy()).cast("B")])
    assert all(torch.equal(layer[b], payload[i]) for i, layer in enumerate(layers)
               for b in (1, 2))
    assert all(not layer[b].any() for layer in layers for b in (0, 3))
    out = torch.zeros_like(payload)
    blocks.copy_out(2, memoryview(out.numpy()).cast("B"))
    assert torch.equal(out, payload)


def _records(count: int, layers: int) -> tuple[torch.Tensor, list[int]]:
    """``count`` record payloads of ``layers`` layers (``(count, layers, BLOCK, 2, 16)``,
    each layer's values distinct) and their checksums."""
    payloads = torch.arange(count * layers * BLOCK * 32, dtype=torch.float32).view(
        count, layers, BLOCK, 2, 16)
    return payloads, [checksum([memoryview(p.numpy()).cast("B")]) for p in payloads]


def test_a_layered_copy_lands_each_layer_of_every_block_before_its_waiter_returns() -> None:
    layers = [torch.zeros(6, BLOCK, 2, 16) for _ in range(4)]  # vLLM-CPU: a run a layer
    payloads, sums = _records(3, 4)
    sums[2] ^= 1  # the third record's checksum does not match its bytes
    views = [memoryview(p.numpy()).cast("B") for p in payloads]
    copy = LayeredCopy(BlockBytes(layers), [5, 0, 3], views, sums)
    landed: list[bool] = []

    def forward() -> None:  # as vLLM's attention layers: each waits for its own layer
        for layer in range(4):
            copy.wait(layer)
            landed.append(all(torch.equal(layers[layer][b], payloads[i, layer])
                              for i, b in enumerate([5, 0, 3])))

    reader = threading.Thread(target=forward)
    reader.start()
    copy.run()
    reader.join(10)
    assert landed == [True] * 4
    assert copy.result() == [True, True, False]
    assert not any(layer[b].any() for layer in layers for b in (1, 2, 4))


def test_a_layered_copy_that_fails_releases_its_waiters_and_reports_every_block_bad() -> None:
    layers = [torch.zeros(2, BLOCK, 2, 16) for _ in range(3)]
    payloads, sums = _records(2, 3)
    views = [memoryview(p.numpy()).cast("B") for p in payloads]
    with pytest.raises(ValueError, match="payloads of 2048 bytes, expected 3072"):
        LayeredCopy(BlockBytes(layers), [0], [views[0][:2048]], sums[:1])  # cut short
    copy = LayeredCopy(BlockBytes(layers), [0, 1], views, sums)
    views[1].release()  # the second record's memory is gone by the time it is copied
    with pytest.raises(ValueError):
        copy.run()
    copy.wait(2)  # returns: the copy is over, if not whole
    assert copy.result() == [False, False]


# -- engines on a real store -----------------------------------------------------------------


@pytest.fixture(scope="module")
def store_master() -> Iterator[str]:
    master, endpoint = start_master()
    with master, start_node(endpoint, "64MiB"):
        yield endpoint


@pytest.fixture
def make_core(tiny_model_dir: Callable[..., Path],
              store_master: str) -> Iterator[Callable[..., EngineCore]]:
    path = tiny_model_dir(seed=5)
    cores: list[EngineCore] = []

    def make(**overrides: Any) -> EngineCore:
        fields: dict[str, Any] = {"model": str(path), "dtype": "float32", "block_size": BLOCK,
                                  "kv_cache_bytes": 1 << 20, "store_master": store_master}
        core = EngineCore(EngineConfig(**(fields | overrides)))
        cores.append(core)
        return core

    yield make
    for core in cores:
        core.close()


def run(core: EngineCore, request_id: str, prompt: list[int] = PROMPT,
        tenant: str | None = None) -> tuple[list[int], list[float], TokenOutput]:
    core.add_request(request_id, prompt, GREEDY, tenant)
    tokens: list[int] = []
    logprobs: list[float] = []
    last = None
    while core.has_unfinished():
        for output in core.step():
            tokens += output.token_ids
            logprobs += output.logprobs
            last = output
    assert last is not None and last.finished
    return tokens, logprobs, last


def saved(core: EngineCore) -> EngineCore:
    assert core.store is not None and core.store.wait_saves(10)
    return core


def store_call(core: EngineCore, method: str, *args: Any) -> Any:
    assert core.store is not None
    return core.store.io.run(getattr(core.store.store, method)(*args))


def block_keys(core: EngineCore, request_id: str, prompt: list[int] = PROMPT,
               tenant: str | None = None) -> list[str]:
    request = core.add_request(request_id, prompt, GREEDY, tenant)
    core.abort(request_id)
    return [f"{request.namespace}/{h.hex()}" for h in request.block_hashes]


@pytest.fixture(params=[("auto", 0), ("tcp", 8)], ids=["auto", "tcp"])
def salt(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Loads in both ways, each on prompts of its own (``t ^ salt``): ``auto``, blocks copied
    and checked in place from the node's mapping (same host); ``tcp``, received straight
    into the cache's slices, then checked."""
    transport, salt = request.param
    monkeypatch.setenv("KVCAKE_TRANSFER_TRANSPORT", transport)
    return int(salt)


def test_round_trip_reproduces_recomputation(make_core: Callable[..., EngineCore],
                                             salt: int) -> None:
    writer, reader = make_core(), make_core()
    prompt = [t ^ salt for t in PROMPT]
    cold = run(writer, "cold", prompt)
    assert cold[2].num_store_tokens == 0
    saved(writer)
    local = run(writer, "local", prompt)  # prefix from the writer's own cache: same arithmetic
    loaded = run(reader, "loaded", prompt)
    # all 8 blocks loaded, the last token recomputed (in the last block)
    assert loaded[2].num_store_tokens == loaded[2].num_cached_tokens == len(prompt) - 1
    assert loaded[0] == local[0] == cold[0]
    assert loaded[1] == local[1]  # bit for bit: the stored KV is the computed KV
    torch.testing.assert_close(torch.tensor(loaded[1]), torch.tensor(cold[1]))
    assert reader.store is not None and reader.store.stats.loaded_blocks == 8


def test_a_corrupt_block_is_recomputed_and_replaced(
        make_core: Callable[..., EngineCore], salt: int) -> None:
    writer, reader = make_core(), make_core()
    prompt = [t ^ 1 ^ salt for t in PROMPT]
    cold = run(writer, "cold", prompt)
    keys = block_keys(saved(writer), "keys", prompt)
    record = bytearray(store_call(writer, "get", keys[3]))
    record[HEADER_BYTES + 17] ^= 0x40  # one flipped bit in block 3's payload
    store_call(writer, "remove", keys[3], True)
    store_call(writer, "put", keys[3], bytes(record))

    tokens, _, out = run(reader, "reader", prompt)
    assert tokens == cold[0]
    assert out.num_store_tokens == 3 * BLOCK  # blocks 0-2 loaded, 3.. recomputed
    assert reader.store is not None and reader.store.stats.rejected_blocks == 1
    saved(reader)  # the reader stored its recomputed block 3 in place of the bad one
    good = bytearray(store_call(reader, "get", keys[3]))
    assert good != record and reader.store.layout.check(memoryview(good), bytes.fromhex(
        keys[3].rsplit("/", 1)[1])) is None


def test_a_block_the_store_lost_is_saved_again(make_core: Callable[..., EngineCore]) -> None:
    """A lookup that finds a block gone (evicted, removed) makes the next save of it count,
    though this instance had stored it before."""
    writer = make_core()
    prompt = [t ^ 7 for t in PROMPT]
    run(writer, "cold", prompt)
    keys = block_keys(saved(writer), "keys", prompt)
    store_call(writer, "remove", keys[5], True)
    connector = writer.store
    assert connector is not None
    namespace = keys[0].rsplit("/", 1)[0]
    hashes = [bytes.fromhex(key.rsplit("/", 1)[1]) for key in keys]
    assert connector.num_matched_blocks(namespace, hashes) == 5
    before = connector.stats.saved_blocks
    connector.save(namespace, list(range(len(keys))), hashes)
    saved(writer)
    assert connector.stats.saved_blocks == before + 1  # block 5 only: the rest are known
    assert store_call(writer, "batch_is_exist", keys) == [1] * len(keys)


def test_a_layered_load_gives_what_a_whole_load_gives(make_core: Callable[..., EngineCore],
                                                      salt: int) -> None:
    """``start_load`` (layer by layer on a helper thread; the ``tcp`` case loads at once,
    its replica being elsewhere) leaves the same bytes as ``load``, stops at the same
    corrupt block and counts the same."""
    writer, reader = make_core(), make_core()
    prompt = [t ^ 5 ^ salt for t in PROMPT]
    run(writer, "cold", prompt)
    keys = block_keys(saved(writer), "keys", prompt)
    record = bytearray(store_call(writer, "get", keys[5]))
    record[-1] ^= 0x01
    store_call(writer, "remove", keys[5], True)
    store_call(writer, "put", keys[5], bytes(record))
    connector = reader.store
    assert connector is not None and len(connector.layers[0]) >= 16
    prefix = keys[0].rsplit("/", 1)[0]
    hashes = [bytes.fromhex(key.rsplit("/", 1)[1]) for key in keys]

    pending = connector.start_load(prefix, list(range(8, 16)), hashes)
    for layer in range(len(connector.layers)):
        pending.wait(layer)
    assert connector.finish_load(pending) == 5
    assert connector.load(prefix, list(range(8)), hashes) == 5
    assert all(torch.equal(layer[:5], layer[8:13]) for layer in connector.layers)
    assert (connector.stats.loaded_blocks, connector.stats.rejected_blocks) == (10, 2)


def test_save_slots_lie_page_aligned_as_the_cache_and_segments_do(
        make_core: Callable[..., EngineCore]) -> None:
    """A slot 16 bytes into its page (a bytearray's) made copies into 2 of every 256 slots ten
    times slower on an AMD EPYC (4K aliasing); the slots now start on a page, pre-faulted."""
    connector = make_core().store
    assert connector is not None
    record = connector._record(1)
    first = ctypes.addressof(ctypes.c_char.from_buffer(connector._record(0)))
    assert first % mmap.PAGESIZE == 0
    assert ctypes.addressof(ctypes.c_char.from_buffer(record)) - first == len(record)


def test_a_step_that_completes_more_blocks_than_256_saves_every_one(
        make_core: Callable[..., EngineCore]) -> None:
    """The save ring holds every block one step can complete: a 400-token prompt in 1-token
    blocks, one step, completes 400 at once (a 256-slot ring dropped 144 of them)."""
    core = make_core(block_size=1, max_num_batched_tokens=512, kv_cache_bytes=4 << 20)
    prompt = [(7 * i) % 250 + 3 for i in range(400)]
    run(core, "long", prompt)
    store = saved(core).store
    assert store is not None
    assert (store.stats.dropped_blocks, store.stats.saved_blocks) == (0, 400)


def test_blocks_of_another_dtype_or_tenant_never_match(
        make_core: Callable[..., EngineCore]) -> None:
    writer = make_core()
    prompt = [t ^ 2 for t in PROMPT]
    run(writer, "w", prompt, tenant="alice")
    saved(writer)
    assert run(make_core(), "other-tenant", prompt, tenant="bob")[2].num_store_tokens == 0
    other_dtype = make_core(dtype="bfloat16")
    assert run(other_dtype, "other-dtype", prompt, tenant="alice")[2].num_store_tokens == 0
    assert block_keys(writer, "k1", prompt, "alice")[0] != block_keys(
        other_dtype, "k2", prompt, "alice")[0]
    assert run(make_core(), "same", prompt, tenant="alice")[2].num_store_tokens == len(prompt) - 1


def test_a_foreign_record_under_our_key_is_refused(make_core: Callable[..., EngineCore]) -> None:
    writer, reader = make_core(), make_core()
    prompt = [t ^ 3 for t in PROMPT]
    keys = block_keys(writer, "keys", prompt)
    assert writer.store is not None
    ours = writer.store.layout
    forged = replace(ours, fingerprint="0" * 16)
    store_call(writer, "put", keys[0], bytes(_record(forged, bytes.fromhex(
        keys[0].rsplit("/", 1)[1]))))
    tokens, _, out = run(reader, "reader", prompt)
    assert out.num_store_tokens == 0
    assert reader.store is not None and reader.store.stats.rejected_blocks == 1
    assert tokens == run(make_core(store_master=""), "plain", prompt)[0]


def test_an_unreachable_store_means_recompute(tiny_model_dir: Callable[..., Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVCAKE_STORE_RPC_TIMEOUT_S", "1")
    master, endpoint = start_master()
    with master, start_node(endpoint, "16MiB"):
        core = EngineCore(EngineConfig(model=str(tiny_model_dir(seed=5)), dtype="float32",
                                       block_size=BLOCK, kv_cache_bytes=1 << 20,
                                       store_master=endpoint))
    try:  # master and node are gone now
        tokens, _, out = run(core, "after", [t ^ 4 for t in PROMPT])
        assert len(tokens) == GREEDY.max_tokens and out.num_store_tokens == 0
    finally:
        core.close()
