"""The engine on a CUDA device (skipped where torch sees none): in float32 the packaged model
draws the CPU's greedy tokens there and a seeded request samples the same tokens alone or in
a batch; a bfloat16 batch finishes with its pool intact."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kvcake.engine.llm import LLM, CompletionOutput
from kvcake.model import ModelFiles
from kvcake.wire.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, logprobs=0)
AGREE = 6  # leading greedy tokens CPU and GPU must share (later ones may flip on a near tie)


def _engine(files: ModelFiles, device: str, dtype: str = "float32") -> LLM:
    return LLM(model=str(files.path), dtype=dtype, device=device, kv_cache_bytes=256 << 20)


def _greedy(llm: LLM) -> list[CompletionOutput]:
    return [result.outputs[0] for result in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def gpu_llm(smollm2_files: ModelFiles) -> Iterator[LLM]:
    with _engine(smollm2_files, "cuda") as llm:
        yield llm


def test_float32_greedy_tokens_match_the_cpu(smollm2_files: ModelFiles, gpu_llm: LLM) -> None:
    with _engine(smollm2_files, "cpu") as cpu_llm:
        cpu = _greedy(cpu_llm)
    for ours, theirs in zip(_greedy(gpu_llm), cpu, strict=True):
        assert ours.token_ids[:AGREE] == theirs.token_ids[:AGREE]
        assert ours.logprobs[:AGREE] == pytest.approx(theirs.logprobs[:AGREE], abs=2e-3)


def test_a_bfloat16_batch_finishes_and_frees_every_block(smollm2_files: ModelFiles) -> None:
    prompts = [f"{p} {i}" for i in range(8) for p in PROMPTS]
    with _engine(smollm2_files, "cuda", "bfloat16") as llm:
        results = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
        for result in results:
            out = result.outputs[0]
            assert out.text and out.finish_reason in ("stop", "length")
            assert llm.tokenizer.decode(out.token_ids) == out.text
        pool = llm.core.scheduler.kv.pool
        pool.check_integrity()
        assert pool.num_free_blocks == pool.num_blocks


def test_a_seeded_request_samples_alike_alone_and_in_a_batch(gpu_llm: LLM) -> None:
    seeded = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    [alone] = gpu_llm.generate([PROMPTS[1]], seeded)
    others = SamplingParams(max_tokens=16, temperature=1.0)
    batch = gpu_llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [others, seeded, others])
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids
