"""Baselines for the engine benchmark: Hugging Face eager generation, and a vLLM-CPU driver.

Every runner turns one batch of equal-length prompts into a :class:`Timing`, split the same
way for every system::

    start ---- prefill ----> every sequence has its first token ---- decode ----> last token
           prefill_tokens = B * prompt_len       decode_tokens = tokens drawn after that point

HF runs in the benchmark's own process (same torch threads as kvcake): ``model.generate``
with greedy decoding, no end-of-sequence token (so it always draws ``new_tokens``), and a
streamer that stamps the moment each step's tokens are chosen.

vLLM runs in another interpreter (a vLLM-CPU virtual environment), so this file is also a
script there: ``python engine_baselines.py vllm PLAN.json`` imports only the standard library
and vllm, loads the model, says it is ready, then times each batch its standard input asks
for, one JSON line in, one out, so its repetitions take turns with kvcake's. vLLM has no per-step
hook that is stable across its versions, so prefill is timed as ``generate`` with one new
token, and decode as the extra time of ``generate`` with ``new_tokens`` on the same prompts
(prefix caching off, so the second call prefills again).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DRIVER = Path(__file__)


@dataclass(frozen=True)
class Timing:
    """One measured batch: seconds until every sequence has its first token (prefill), then
    seconds until the last token (decode), and the tokens each phase processed or drew."""

    prefill_tokens: int
    prefill_s: float
    decode_tokens: int
    decode_s: float


class HfRunner:
    """transformers' own model (``attn_implementation="eager"``) loaded from ``path``."""

    name = "hf"

    def __init__(self, path: Path, dtype: str, device: str = "cpu") -> None:
        import torch

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never the network
        transformers = importlib.import_module("transformers")
        transformers.utils.logging.disable_progress_bar()  # no weight-loading bar mid-table
        self._torch = torch
        self._transformers = transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), attn_implementation="eager")
        self.model = model.to(device).eval()
        self.device = device

    def run(self, prompts: list[list[int]], new_tokens: int) -> Timing:
        torch = self._torch
        input_ids = torch.tensor(prompts, dtype=torch.long, device=self.device)  # (B, len)
        config = self._transformers.GenerationConfig(
            max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=None)
        clock = _StepClock(self._transformers)
        start = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                         generation_config=config, streamer=clock.streamer)
        stamps = clock.stamps  # [prompt, token 1, ..., token N]
        assert len(stamps) == new_tokens + 1, "one streamer call per step, after the prompt's"
        assert output.shape[1] == input_ids.shape[1] + new_tokens, "HF drew every token"
        batch, prompt_len = input_ids.shape
        return Timing(batch * prompt_len, stamps[1] - start,
                      batch * (new_tokens - 1), stamps[-1] - stamps[1])


class _StepClock:
    """A generate streamer that records when each step's tokens (first the prompt) arrive."""

    def __init__(self, transformers: Any) -> None:
        self.stamps: list[float] = []
        stamps = self.stamps

        class Streamer(transformers.generation.streamers.BaseStreamer):  # type: ignore[misc]
            def put(self, value: Any) -> None:
                stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        self.streamer = Streamer()


# --- vLLM driver: runs under the vLLM-CPU interpreter; standard library and vllm only ---

def vllm_plan(model: Path, dtype: str, threads: int, longest: int, widest: int) -> dict[str, Any]:
    """The driver's input: the model, and room for ``widest`` sequences of ``longest``
    tokens (prompt and new tokens)."""
    return {"model": str(model), "dtype": dtype, "threads": threads, "longest": longest,
            "widest": widest}


def _vllm_environment(threads: int) -> None:
    """vLLM-CPU reads these when imported; a caller's own settings win."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB of KV cache
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")


def _vllm_llm(vllm: Any, plan: dict[str, Any]) -> Any:
    return vllm.LLM(model=plan["model"], dtype=plan["dtype"], max_model_len=plan["longest"] + 16,
                    max_num_seqs=plan["widest"], enable_prefix_caching=False, seed=0)


def _vllm_generate(vllm: Any, llm: Any, prompts: list[list[int]], max_tokens: int) -> float:
    params = vllm.SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0,
                                 ignore_eos=True, detokenize=False)
    inputs = [{"prompt_token_ids": prompt} for prompt in prompts]
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    drawn = [len(output.outputs[0].token_ids) for output in outputs]
    assert drawn == [max_tokens] * len(prompts), f"vLLM drew {drawn} tokens, not {max_tokens}"
    return seconds


def _vllm_timing(vllm: Any, llm: Any, prompts: list[list[int]], new_tokens: int) -> Timing:
    prefill_s = _vllm_generate(vllm, llm, prompts, 1)
    total_s = _vllm_generate(vllm, llm, prompts, new_tokens)
    batch = len(prompts)
    return Timing(batch * len(prompts[0]), prefill_s, batch * (new_tokens - 1),
                  max(total_s - prefill_s, 1e-9))


READY = {"ready": True}


def vllm_main(argv: list[str]) -> int:
    """``vllm PLAN.json``: load the model and print :data:`READY`; then each line of standard
    input (``{"prompts": [[ids]], "new_tokens": n}``) gets its :class:`Timing` as one JSON line,
    until the input ends."""
    if len(argv) != 2 or argv[0] != "vllm":
        print("usage: engine_baselines.py vllm PLAN.json", file=sys.stderr)
        return 2
    plan = json.loads(Path(argv[1]).read_text())
    _vllm_environment(plan["threads"])
    vllm = importlib.import_module("vllm")
    llm = _vllm_llm(vllm, plan)
    print(json.dumps(READY), flush=True)
    for line in sys.stdin:
        batch = json.loads(line)
        timing = _vllm_timing(vllm, llm, batch["prompts"], batch["new_tokens"])
        print(json.dumps(asdict(timing)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(vllm_main(sys.argv[1:]))
