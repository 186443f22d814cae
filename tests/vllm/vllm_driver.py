"""A vLLM-CPU instance with kvcake's connector, driven over stdin/stdout by the tests (it
runs in the vLLM venv). Arguments: MODEL_DIR KV_TRANSFER_CONFIG_JSON. It prints ``ready``,
then answers each JSON line: ``{"prompt": [ids]}`` with ``{"tokens": [...]}`` (4 greedy
tokens), ``{"keys": [ids]}`` with the store keys of the prompt's full blocks as the
connector names them. End of input ends it."""

from __future__ import annotations

import json
import sys
from typing import Any


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
    llm = LLM(model=model, tokenizer=model, dtype="bfloat16", enforce_eager=True,
              max_model_len=4096, seed=0, kv_transfer_config=transfer)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    print("ready", flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        if "keys" in ask:
            print(json.dumps({"keys": _keys(llm, ask["keys"])}), flush=True)
            continue
        [out] = llm.generate([{"prompt_token_ids": ask["prompt"]}], params, use_tqdm=False)
        print(json.dumps({"tokens": list(out.outputs[0].token_ids)}), flush=True)


if __name__ == "__main__":
    main()
