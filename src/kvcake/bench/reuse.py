"""``kvcake bench reuse``: time to first token with the prompt's KV cold, in the store, local.

Mooncake's thesis on one box. A store master and a storage node run as separate processes;
two engines run here:

* **cold**: engine A sees a fresh prompt and computes every token (and saves the prompt's
  full blocks to the store as it goes);
* **local**: engine A sees the same prompt again: its own paged cache has the prefix;
* **store**: engine B, whose cache has never seen the prompt, loads the prefix from the
  store (same-host node: a copy out of the node's shared memory) and computes the rest.

Every prompt is fresh random tokens, so no mode benefits from an earlier repeat. The first
token (greedy) must agree, or the benchmark stops: store and local exactly (the same K/V,
the same arithmetic), and cold up to a near-tie (the reused token within ``TIE_NATS`` of the
cold run's best: a hit computes the last token in another kernel than a cold prefill does,
and in bf16 two tokens' logits can tie or swap by one rounding step).
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kvcake.bench.measure import print_rows
from kvcake.common.config import MiB
from kvcake.engine.config import EngineConfig
from kvcake.engine.core import DTYPES, EngineCore
from kvcake.model import resolve_model
from kvcake.ops import start_master, start_node
from kvcake.wire.sampling import SamplingParams

MODES = ("cold", "store", "local")
TIE_NATS = 0.3  # two bf16 rounding steps of a logit between 16 and 32
_TOP = 5  # log-probabilities the cold run reports
TARGET_LEN, TARGET_RATIO = 4096, 30.0


@dataclass(frozen=True)
class ReusePlan:
    lengths: tuple[int, ...]
    repeats: int
    block_size: int = 16


def plan_for(quick: bool, lengths: Sequence[int] | None = None) -> ReusePlan:
    default = (1024, 4096) if quick else (1024, 4096, 8000)  # 8k: the model holds 8192
    return ReusePlan(tuple(lengths or default), 1 if quick else 3)


@contextmanager
def _store_cluster(segment_size: str) -> Iterator[str]:
    master, endpoint = start_master()
    with master, start_node(endpoint, segment_size):
        yield endpoint


def _kv_bytes_per_token() -> int:
    """The model's KV bytes per token in the dtype the engine will pick on this CPU."""
    config = EngineConfig()  # its dtype resolved: bf16 where the CPU has it, else float32
    return resolve_model(config.model).config.kv_bytes_per_token(DTYPES[config.dtype].itemsize)


def _engine_config(master: str, plan: ReusePlan, per_token: int) -> EngineConfig:
    """``per_token``: KV bytes a token (:func:`_kv_bytes_per_token`)."""
    longest = max(plan.lengths) + 16
    kv_bytes = max(256 * MiB, 2 * longest * per_token)  # room for two prompts
    return EngineConfig(store_master=master, kv_cache_bytes=kv_bytes,
                        block_size=plan.block_size, max_model_len=longest)


@dataclass(frozen=True)
class _First:
    """One mode's first token: seconds to it, the token, prompt tokens reused, and (when
    asked for) the log-probabilities of the best few tokens."""

    ttft_s: float
    token_id: int
    reused: int
    top: dict[int, float]


def _ttft(core: EngineCore, request_id: str, prompt: list[int], top: int = 0) -> _First:
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=top or None)
    start = time.perf_counter()
    core.add_request(request_id, prompt, params)
    while core.has_unfinished():
        for output in core.step():
            if output.token_ids:
                elapsed = time.perf_counter() - start
                best = dict(output.top_logprobs[0]) if top else {}
                return _First(elapsed, output.token_ids[0], output.num_cached_tokens, best)
    raise RuntimeError(f"{request_id} produced no token")


def _check_first_tokens(length: int, cold: _First, store: _First, local: _First) -> None:
    near = {t for t, lp in cold.top.items() if lp >= cold.top[cold.token_id] - TIE_NATS}
    if store.token_id != local.token_id or store.token_id not in near:
        raise RuntimeError(f"reused KV changed the first token at {length}: cold "
                           f"{cold.token_id} (best: {cold.top}), store {store.token_id}, "
                           f"local {local.token_id}")


def _measure_one(writer: EngineCore, reader: EngineCore, length: int,
                 rng: random.Random, tag: str) -> list[dict[str, Any]]:
    prompt = [rng.randrange(100, 40000) for _ in range(length)]
    cold = _ttft(writer, f"cold-{tag}", prompt, top=_TOP)
    assert writer.store is not None
    writer.store.wait_saves()
    store = _ttft(reader, f"store-{tag}", prompt)
    local = _ttft(writer, f"local-{tag}", prompt)
    _check_first_tokens(length, cold, store, local)
    results = {"cold": cold, "store": store, "local": local}
    return [{"prompt_len": length, "mode": mode, "ttft_s": r.ttft_s, "reused_tokens": r.reused}
            for mode, r in results.items()]


def measure(plan: ReusePlan, log: Any = None) -> list[dict[str, Any]]:
    """Every (length, mode) sample of the plan; one store cluster and two engines."""
    rng = random.Random(20241125)
    samples: list[dict[str, Any]] = []
    per_token = _kv_bytes_per_token()
    segment = max(1024 * MiB, 4 * max(plan.lengths) * per_token)  # 4 prompts
    with _store_cluster(f"{-(-segment // MiB)}MiB") as master:
        config = _engine_config(master, plan, per_token)
        writer, reader = EngineCore(config), EngineCore(config)
        try:
            _measure_one(writer, reader, 64, rng, "warmup")
            for repeat in range(plan.repeats):
                for length in plan.lengths:
                    if log is not None:
                        print(f"  prompt {length} tokens, repeat {repeat + 1}", file=log)
                    samples += _measure_one(writer, reader, length, rng, f"{length}-{repeat}")
        finally:
            writer.close()
            reader.close()
    return samples


def summarise(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median TTFT per (length, mode), and cold/store, cold/local speed-ups per length."""
    rows: list[dict[str, Any]] = []
    for length in sorted({s["prompt_len"] for s in samples}):
        medians = {mode: statistics.median(s["ttft_s"] for s in samples
                                           if s["prompt_len"] == length and s["mode"] == mode)
                   for mode in MODES}
        reused = max(s["reused_tokens"] for s in samples if s["prompt_len"] == length)
        rows.append({"prompt_len": length, **{f"{m}_s": medians[m] for m in MODES},
                     "store_speedup": medians["cold"] / medians["store"],
                     "local_speedup": medians["cold"] / medians["local"],
                     "reused_tokens": reused})
    return rows


def verdict(rows: list[dict[str, Any]]) -> str | None:
    row = next((r for r in rows if r["prompt_len"] == TARGET_LEN), None)
    if row is None:
        return None
    met = row["store_speedup"] >= TARGET_RATIO
    return (f"target: store hit >= {TARGET_RATIO:.0f}x faster than recompute at {TARGET_LEN} "
            f"tokens: {row['store_speedup']:.1f}x ({'met' if met else 'MISSED'})")


def run_reuse_bench(quick: bool, as_json: bool, lengths: Sequence[int] | None = None) -> int:
    plan = plan_for(quick, lengths)
    samples = measure(plan, None if as_json else sys.stderr)
    rows = summarise(samples)
    if as_json:
        print_rows([{"prompt_len": s["prompt_len"], "mode": s["mode"], "ttft_s": s["ttft_s"]}
                    for s in samples], [], True)
        print_rows([{"prompt_len": r["prompt_len"], "ratio": f"cold/{mode}",
                     "value": r[f"{mode}_speedup"]} for r in rows for mode in ("store", "local")],
                   [], True)
        return 0
    print(f"TTFT (median seconds) of SmolLM2-135M {EngineConfig().dtype}, prompt KV cold / in "
          "the store / local")
    print_rows(rows, [("prompt_len", "prompt"), ("cold_s", "cold s"), ("store_s", "store s"),
                      ("local_s", "local s"), ("store_speedup", "cold/store"),
                      ("local_speedup", "cold/local"), ("reused_tokens", "reused")], False)
    line = verdict(rows)
    if line:
        print(line)
    return 0
