"""kvcake's compiled CPU kernels: paged decode and prefill attention against plain attention
over gathered K/V, the fused element-wise steps against the PyTorch ops they replace, the build
cache, and the fall-back to PyTorch's ops where they cannot be built."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvcake.engine.config import EngineConfig
from kvcake.engine.core import EngineCore
from kvcake.engine.model import kernels
from kvcake.engine.model.kernels import (
    CpuKernels,
    PagedDecodes,
    PagedPrefills,
    load_cpu_kernels,
)
from kvcake.engine.model.llama import _rms_norm, _rope
from kvcake.engine.penalties import TokenHistory
from kvcake.engine.sampling import Sampler
from kvcake.model import ModelFiles
from kvcake.wire.sampling import SamplingParams

BLOCK = 16
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernels")


def build(dtype: torch.dtype, head_dim: int, groups: int, cache: Path) -> CpuKernels:
    built = load_cpu_kernels(dtype, head_dim, groups, cache)
    assert built is not None, "the CPU kernels did not build (is a C compiler there?)"
    return built


def paged_case(lens: list[int], kv_heads: int, groups: int, head_dim: int, dtype: torch.dtype,
               seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PagedDecodes]:
    """Random q and a cache whose blocks are handed out in a scrambled order."""
    gen = torch.Generator().manual_seed(seed)
    width = -(-max(lens) // BLOCK)
    num_blocks = len(lens) * width + 3
    order = torch.randperm(num_blocks, generator=gen)[:len(lens) * width].view(len(lens), width)
    cache = torch.randn(2, num_blocks * BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(len(lens), kv_heads * groups, head_dim, generator=gen).to(dtype)
    decodes = PagedDecodes(0, order.to(torch.int32), torch.tensor(lens, dtype=torch.int32),
                           BLOCK)
    return q, cache[0], cache[1], decodes


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decodes: PagedDecodes,
              scale: float) -> torch.Tensor:
    """Each sequence alone: gather its slots, float32 softmax attention per query head."""
    rows = []
    groups = q.shape[1] // k.shape[1]
    for b, length in enumerate(decodes.lens.tolist()):
        positions = torch.arange(length)
        slots = decodes.tables[b].long()[positions // BLOCK] * BLOCK + positions % BLOCK
        ks = k[slots].float().repeat_interleave(groups, dim=1)  # (len, heads, dim)
        vs = v[slots].float().repeat_interleave(groups, dim=1)
        weights = (torch.einsum("hd,thd->ht", q[b].float(), ks) * scale).softmax(-1)
        rows.append(torch.einsum("ht,thd->hd", weights, vs))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("kv_heads", "groups", "head_dim"), [(3, 3, 64), (2, 1, 16)])
def test_kernel_equals_attention_over_gathered_blocks(kernel_dir: Path, dtype: torch.dtype,
                                                      kv_heads: int, groups: int,
                                                      head_dim: int) -> None:
    kernel = build(dtype, head_dim, groups, kernel_dir)
    # lengths around the kernel's 64-token chunks and the 16-token blocks
    lens = [1, 15, 16, 17, 63, 64, 65, 129, 300]
    q, k, v, decodes = paged_case(lens, kv_heads, groups, head_dim, dtype, seed=len(lens))
    out = torch.full_like(q, float("nan"))
    kernel.paged_decode(q, k, v, decodes, head_dim ** -0.5, out)
    expected = reference(q, k, v, decodes, head_dim ** -0.5)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def prefill_case(chunks: list[tuple[int, int]], kv_heads: int, groups: int, head_dim: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                              PagedPrefills, PagedDecodes]:
    """Prompt chunks ``(first position, length)`` over a scrambled cache, and the same query
    rows as single-token decodes (row ``r`` of a chunk sees ``first + r + 1`` tokens)."""
    ends = [first + length for first, length in chunks]
    q, k, v, whole = paged_case(ends, kv_heads, groups, head_dim, dtype, seed=len(chunks))
    rows = sum(length for _, length in chunks)
    q = torch.randn(rows, kv_heads * groups, head_dim,
                    generator=torch.Generator().manual_seed(rows)).to(dtype)
    owner = torch.tensor([c for c, (_, length) in enumerate(chunks) for _ in range(length)])
    seen = [first + r + 1 for first, length in chunks for r in range(length)]
    prefills = PagedPrefills(whole.tables, torch.tensor([f for f, _ in chunks], dtype=torch.int32),
                             torch.tensor([n for _, n in chunks], dtype=torch.int32), BLOCK)
    as_decodes = PagedDecodes(0, whole.tables[owner].contiguous(),
                              torch.tensor(seen, dtype=torch.int32), BLOCK)
    return q, k, v, prefills, as_decodes


# (first position, length): whole prompts, chunks after a cached prefix, one-token chunks,
# lengths around the kernel's 16-row tiles, 64-token chunks and 16-token blocks
PREFILL_CHUNKS = [(0, 1), (0, 17), (16, 1), (5, 40), (0, 130), (64, 64), (100, 33), (63, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("kv_heads", "groups", "head_dim"), [(3, 3, 64), (2, 1, 16)])
def test_prefill_kernel_equals_causal_attention_over_gathered_blocks(
        kernel_dir: Path, dtype: torch.dtype, kv_heads: int, groups: int,
        head_dim: int) -> None:
    kernel = build(dtype, head_dim, groups, kernel_dir)
    q, k, v, prefills, as_decodes = prefill_case(PREFILL_CHUNKS, kv_heads, groups, head_dim,
                                                 dtype)
    out = torch.full_like(q, float("nan"))
    kernel.paged_prefill(q, k, v, prefills, head_dim ** -0.5, out)
    expected = reference(q, k, v, as_decodes, head_dim ** -0.5)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def same_but_rounding(got: torch.Tensor, expected: torch.Tensor) -> None:
    """A few steps of the dtype apart at most (the fused kernels sum, fuse multiply-adds and
    take exp in another order); in bf16, whose rounding they spell out bit by bit, mostly
    equal."""
    if got.dtype == torch.bfloat16:
        equal = (got == expected).float().mean().item()
        assert equal >= 0.9, equal
    steps = 4 * torch.finfo(got.dtype).eps
    torch.testing.assert_close(got, expected, rtol=steps, atol=steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_fused_steps_equal_the_ops_they_replace(kernel_dir: Path, dtype: torch.dtype,
                                                rows: int) -> None:
    heads, kv_heads, dim, hidden, width = 9, 3, 64, 576, 1536
    fused = build(dtype, dim, heads // kv_heads, kernel_dir)
    gen = torch.Generator().manual_seed(rows)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    x, delta, weight = rand(rows, hidden), rand(rows, hidden), rand(hidden)
    expected_x = x + delta
    expected = _rms_norm(expected_x, weight, 1e-5)
    got = fused.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(x, expected_x)  # the residual is added in place, rounded as torch does
    same_but_rounding(got, expected)
    same_but_rounding(fused.add_rms_norm(x, None, weight, 1e-5), _rms_norm(x, weight, 1e-5))

    qkv = rand(rows, (heads + 2 * kv_heads) * dim)
    angles = torch.rand(rows, dim // 2, generator=gen) * 6.3
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype)
    q, k = fused.rope(qkv, cos, sin, heads, kv_heads)
    same_but_rounding(q, _rope(qkv[:, :heads * dim].view(rows, heads, dim), cos, sin))
    same_but_rounding(k, _rope(qkv[:, heads * dim:(heads + kv_heads) * dim]
                               .view(rows, kv_heads, dim), cos, sin))

    gate_up = rand(rows, 2 * width)
    gate, up = gate_up.chunk(2, dim=-1)
    same_but_rounding(fused.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize(("rows", "vocab"), [(1, 49152), (3, 7), (40, 1000), (2, 1)])
def test_greedy_picks_the_first_argmax_and_its_log_probability(kernel_dir: Path, rows: int,
                                                               vocab: int) -> None:
    kernel = build(torch.bfloat16, 64, 3, kernel_dir)
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(torch.bfloat16).float()
    if vocab > 5:
        logits[0, [5, 2]] = logits[0].max() + 1  # a tie: the lower id wins, as in torch
        logits[-1, 3] = 1e4  # so peaked that every other term of the sum is a denormal
    ids, logprobs = kernel.greedy(logits)
    assert ids.tolist() == logits.argmax(dim=-1).tolist()
    expected = logits.log_softmax(dim=-1).gather(1, ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)


def test_the_sampler_takes_the_greedy_kernel_only_for_plainly_greedy_batches(
        kernel_dir: Path) -> None:
    kernel = build(torch.bfloat16, 64, 3, kernel_dir)
    calls: list[int] = []

    def counted(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(logits.shape[0])
        return kernel.greedy(logits)

    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(1)) * 3
    plain, fast = Sampler(seed=7), Sampler(seed=7, greedy=counted)
    greedy = SamplingParams(temperature=0.0)
    lasts = [greedy,
             SamplingParams(temperature=0.8),  # one row draws
             SamplingParams(temperature=0.0, logprobs=2),
             SamplingParams(temperature=0.0, presence_penalty=1.0)]
    batches = [[greedy, greedy, greedy, last] for last in lasts]
    for params in batches:
        histories = [TokenHistory([1, 2], [3], frozenset()) for _ in params]
        want = plain.sample(logits, params, [None] * 4, histories)
        got = fast.sample(logits, params, [None] * 4, histories)
        assert got.token_ids == want.token_ids and got.top_logprobs == want.top_logprobs
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs))
    assert calls == [4]  # the first batch only


def test_loading_the_kernel_leaves_subnormal_floats_alone(tmp_path: Path) -> None:
    """Linking with -ffast-math would switch the whole process to flush-to-zero."""
    assert build(torch.bfloat16, 64, 3, tmp_path) is not None
    tiny = float("5e-324")  # the smallest subnormal double
    assert tiny * 1.0 > 0.0
    assert torch.tensor([1e-40]).mul(1.0).item() > 0.0  # a float32 subnormal


def over_threads(attend: Callable[[torch.Tensor], None], like: torch.Tensor
                 ) -> list[torch.Tensor]:
    """``attend(out)`` run with 1, 2 and 3 threads (3: fewer than two sequences a thread, so
    the decode kernel splits by head); each run's ``out``."""
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = torch.full_like(like, float("nan"))
            attend(out)
            runs.append(out)
    finally:
        torch.set_num_threads(before)
    return runs


def test_results_do_not_depend_on_threads_or_batch(kernel_dir: Path) -> None:
    kernel = build(torch.bfloat16, 64, 3, kernel_dir)
    q, k, v, decodes = paged_case([40, 200, 7, 513], 3, 3, 64, torch.bfloat16, seed=5)
    runs = over_threads(lambda out: kernel.paged_decode(q, k, v, decodes, 0.125, out), q)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    # one sequence on its own gets exactly the row it got inside the batch
    alone = PagedDecodes(0, decodes.tables[1:2].contiguous(), decodes.lens[1:2].contiguous(),
                         BLOCK)
    out = torch.empty_like(q[1:2])
    kernel.paged_decode(q[1:2].contiguous(), k, v, alone, 0.125, out)
    assert torch.equal(out[0], runs[0][1])


def test_prefill_results_do_not_depend_on_threads_or_the_other_chunks(kernel_dir: Path) -> None:
    kernel = build(torch.bfloat16, 64, 3, kernel_dir)
    q, k, v, prefills, _ = prefill_case(PREFILL_CHUNKS, 3, 3, 64, torch.bfloat16)
    runs = over_threads(lambda out: kernel.paged_prefill(q, k, v, prefills, 0.125, out), q)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    at = sum(length for _, length in PREFILL_CHUNKS[:4])  # chunk 4 on its own
    alone = PagedPrefills(prefills.tables[4:5].contiguous(), prefills.firsts[4:5].contiguous(),
                          prefills.lengths[4:5].contiguous(), BLOCK)
    rows = slice(at, at + PREFILL_CHUNKS[4][1])
    out = torch.empty_like(q[rows])
    kernel.paged_prefill(q[rows].contiguous(), k, v, alone, 0.125, out)
    assert torch.equal(out, runs[0][rows])


def test_short_chunks_after_long_prefixes_split_into_smaller_tiles_alike(
        kernel_dir: Path) -> None:
    """Five rows after 300 tokens make too few tiles for the threads: tiles shrink (to other
    sizes for 1, 2 and 3 threads) and every row's answer stays the same and right."""
    kernel = build(torch.bfloat16, 64, 3, kernel_dir)
    q, k, v, prefills, as_decodes = prefill_case([(300, 5)], 3, 3, 64, torch.bfloat16)
    runs = over_threads(lambda out: kernel.paged_prefill(q, k, v, prefills, 0.125, out), q)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    expected = reference(q, k, v, as_decodes, 0.125)
    tol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(runs[0].float(), expected, atol=tol, rtol=tol)


def test_a_build_is_kept_and_loaded_again_without_compiling(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert build(torch.float32, 16, 2, tmp_path) is not None
    built = list((tmp_path / "kernels").glob("kernels-*.so"))
    assert len(built) == 1 and not list((tmp_path / "kernels").glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns

    def no_compiling(*args: object) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(kernels, "_compile", no_compiling)
    assert load_cpu_kernels(torch.float32, 16, 2, tmp_path) is not None
    assert built[0].stat().st_mtime_ns == stamp
    with pytest.raises(AssertionError, match="compiled again"):  # another shape, another build
        load_cpu_kernels(torch.float32, 16, 4, tmp_path)


@pytest.mark.parametrize(("compiler", "reason"), [("/nonexistent/cc", "no C compiler found"),
                                                  ("false", "false failed")])
def test_without_a_working_compiler_the_kernel_is_none_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        compiler: str, reason: str) -> None:
    monkeypatch.setenv("CC", compiler)
    with caplog.at_level(logging.WARNING, logger="kvcake.engine.model.kernels"):
        assert load_cpu_kernels(torch.float32, 16, 2, tmp_path) is None
    assert reason in caplog.text and "runs on PyTorch's ops" in caplog.text
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))


def test_unsupported_shapes_are_refused_with_the_reason(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvcake.engine.model.kernels"):
        assert load_cpu_kernels(torch.int8, 16, 2, tmp_path) is None
        assert load_cpu_kernels(torch.float32, 4096, 2, tmp_path) is None
    assert "torch.int8" in caplog.text and "head_dim 4096" in caplog.text


def greedy(core: EngineCore, prompts: list[list[int]], count: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=count, temperature=0.0, ignore_eos=True)
    for i, tokens in enumerate(prompts):
        core.add_request(str(i), tokens, params)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while core.has_unfinished():
        for output in core.step():
            got[output.request_id] += output.token_ids
    return [got[str(i)] for i in range(len(prompts))]


def test_the_engine_decodes_with_the_kernel_as_with_sdpa(smollm2_files: ModelFiles,
                                                         tmp_path: Path) -> None:
    """float32, a batch of different lengths, prompts cut into chunks (48-token steps) and one
    that shares another's first blocks: the same greedy tokens on both paths."""
    prompts = [[(7 * i + 31 * n) % 5000 + 20 for i in range(n)] for n in (5, 37, 130)]
    prompts.append([*prompts[2][:96], 99, 98, 97])
    tokens = {}
    for attention in ("paged", "sdpa"):
        config = EngineConfig(dtype="float32", attention=attention, kv_cache_bytes=64 << 20,
                              cache_dir=str(tmp_path), max_num_batched_tokens=48)
        core = EngineCore(config, files=smollm2_files)
        assert core.runner.model.kernels is not None
        assert core.runner.model.reads_pages == (attention == "paged")
        tokens[attention] = greedy(core, prompts, 12)
    assert tokens["paged"] == tokens["sdpa"]


def test_an_engine_without_a_compiler_decodes_on_the_sdpa_path(
        smollm2_files: ModelFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", os.devnull)
    config = EngineConfig(dtype="float32", kv_cache_bytes=64 << 20, cache_dir=str(tmp_path))
    core = EngineCore(config, files=smollm2_files)
    assert config.attention == "paged" and core.runner.model.kernels is None
    assert not core.runner.model.reads_pages
    assert len(greedy(core, [[40, 41, 42]], 4)[0]) == 4
