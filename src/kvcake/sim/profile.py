"""Hardware/model profiles: how long simulated work takes, and how much KV fits where.

A profile states the cost of work in the Conductor's own model (``conductor.cost``), so the
simulated instances and the simulated Conductor price work with one formula::

    prefill_s(new, cached) = fixed + per_token·new + attention·(new²/2 + new·cached)
    decode_step_s(batch, context) = fixed + per_request·batch + per_context_token·context
    transfer_s(bytes) = bytes / network_bytes_per_s

``attention`` is the price of one (query, key) pair: causal attention over ``new`` tokens
on top of ``cached`` ones touches ``new²/2 + new·cached`` pairs, which is why the quadratic
coefficient is half the cross one. Chunked prefill then costs the same attention in total
as one pass over the whole prompt.

Profiles are chosen by name (:data:`PROFILES`) or read from a JSON file of the same fields
(:func:`load_profile`); :func:`fit_profile` makes one from ``kvcake bench engine --json``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from kvcake.common.errors import InvalidParamsError
from kvcake.conductor.cost import CostDefaults, CostModel


@dataclass(frozen=True)
class Profile:
    """One instance type serving one model. Seconds, bytes, tokens and blocks.

    block_tokens: tokens per KV block the instances hash and cache (>= 1).
    kv_bytes_per_token: KV of one token, all layers, K and V.
    prefill_*: see the module docstring; prefill_chunk_tokens is the token budget of one
        engine step (prefill chunks plus one token per decoding request).
    decode_*: see the module docstring.
    network_bytes_per_s: KV moving between instances or from the pool.
    cache_blocks: prefix cache of one instance (its share of DRAM), blocks.
    decode_kv_tokens: KV one instance can hold for its running batch, tokens.
    max_batch: requests decoding at once on one instance.
    """

    name: str
    description: str
    block_tokens: int
    kv_bytes_per_token: int
    prefill_fixed_s: float
    prefill_per_token_s: float
    prefill_attention_s: float
    prefill_chunk_tokens: int
    decode_fixed_s: float
    decode_per_request_s: float
    decode_per_context_token_s: float
    network_bytes_per_s: float
    cache_blocks: int
    decode_kv_tokens: int
    max_batch: int

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, str):
                continue
            if not (math.isfinite(value) and value >= 0):
                raise InvalidParamsError(f"profile {self.name!r}: {field.name} must be "
                                         f"finite and >= 0, got {value}")
        for name in ("block_tokens", "kv_bytes_per_token", "prefill_chunk_tokens",
                     "network_bytes_per_s", "decode_kv_tokens", "max_batch"):
            if not getattr(self, name) > 0:
                raise InvalidParamsError(f"profile {self.name!r}: {name} must be > 0, "
                                         f"got {getattr(self, name)}")

    def cost_defaults(self) -> CostDefaults:
        """The profile as the Conductor's cost model (see the module docstring)."""
        return CostDefaults(
            prefill_fixed_s=self.prefill_fixed_s, prefill_per_token_s=self.prefill_per_token_s,
            prefill_per_token2_s=self.prefill_attention_s / 2,
            prefill_per_token_cached_s=self.prefill_attention_s,
            decode_fixed_s=self.decode_fixed_s, decode_per_request_s=self.decode_per_request_s,
            decode_per_context_token_s=self.decode_per_context_token_s,
            bandwidth_bytes_per_s=self.network_bytes_per_s)

    def kv_seconds(self, num_tokens: int) -> float:
        """Seconds to move the KV of ``num_tokens`` over the network."""
        return num_tokens * self.kv_bytes_per_token / self.network_bytes_per_s

    def cost_model(self) -> CostModel:
        """A cost model that answers with this profile and learns nothing unless fed."""
        return CostModel(self.cost_defaults())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# LLaMA2-70B (80 layers, 64 query / 8 KV heads of 128, bf16) on one node of 8xA800-80GB,
# tensor parallel, derived from the hardware (docs/sim.md shows the arithmetic):
#   prefill: 2·69e9 FLOP per token at 40 % of 8 x 312 TFLOP/s       -> 1.1e-4 s per token
#            4·80·8192 FLOP per (query, key) pair at the same rate  -> 2.1e-9 s per pair
#   decode:  weights 138 GB read per step at 70 % of 8 x 2.0 TB/s   -> 12 ms, plus 8 ms of
#            launches and all-reduces; KV 320 KiB per context token -> 2.9e-8 s per token
#   KV: 2·80·8·128·2 B = 327,680 B per token; 640 GB HBM - 138 GB weights - activations
#       leaves about 400 GB for KV (1.2 M tokens); the paper gives each node's DRAM cache
#       3 M tokens (5,859 blocks of 512, 160 MiB each); its transfer engine moves 87 GB/s
#       over 4 x 200 Gb/s RDMA NICs.
LLAMA2_70B_A800 = Profile(
    name="llama2-70b-a800", description="LLaMA2-70B on one 8xA800-80GB node (the paper's)",
    block_tokens=512, kv_bytes_per_token=327_680,
    prefill_fixed_s=0.02, prefill_per_token_s=1.1e-4, prefill_attention_s=2.1e-9,
    prefill_chunk_tokens=8192,
    decode_fixed_s=0.02, decode_per_request_s=2e-4, decode_per_context_token_s=2.9e-8,
    network_bytes_per_s=87e9, cache_blocks=5859, decode_kv_tokens=1_200_000, max_batch=256)

# SmolLM2-135M, bf16, on this 2-core VM; prefill and decode fitted with :func:`fit_profile`
# to ``kvcake bench engine --json`` (2 threads; prompts of 512 tokens, batches 1/8/32:
# 4.1k prefill tokens/s; decode steps of 37, 44 and 85 ms); the rest is what ``kvcake up``
# gives an instance: block 16, 512-token steps, 512 MiB of KV (23,040 B per token), 32 seats.
SMOLLM2_CPU = Profile(
    name="smollm2-cpu", description="SmolLM2-135M bf16 on 2 CPU cores (kvcake up defaults)",
    block_tokens=16, kv_bytes_per_token=23_040,
    prefill_fixed_s=0.005, prefill_per_token_s=2.45e-4, prefill_attention_s=0.0,
    prefill_chunk_tokens=512,
    decode_fixed_s=0.0333, decode_per_request_s=0.00161, decode_per_context_token_s=0.0,
    network_bytes_per_s=2e9, cache_blocks=1456, decode_kv_tokens=23_301, max_batch=32)

# The same model as ``kvcake up`` places it: one engine thread per instance, prefill and
# decode instances sharing the 2 cores (prefill at nice 10). Prefill and decode costs are
# the Conductor's defaults, which the workers' start-up profiling measures there.
_LIVE = CostDefaults()
SMOLLM2_CPU_UP = replace(
    SMOLLM2_CPU, name="smollm2-cpu-up",
    description="SmolLM2-135M bf16, one thread per instance as kvcake up places them",
    prefill_fixed_s=_LIVE.prefill_fixed_s, prefill_per_token_s=_LIVE.prefill_per_token_s,
    decode_fixed_s=_LIVE.decode_fixed_s, decode_per_request_s=_LIVE.decode_per_request_s)

PROFILES: dict[str, Profile] = {p.name: p for p in (LLAMA2_70B_A800, SMOLLM2_CPU,
                                                    SMOLLM2_CPU_UP)}


def load_profile(name_or_path: str) -> Profile:
    """A profile by name, or from a JSON file holding every :class:`Profile` field."""
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise InvalidParamsError(f"unknown profile {name_or_path!r}: not one of "
                                 f"{', '.join(sorted(PROFILES))} and not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InvalidParamsError(f"profile file {path}: not valid JSON ({exc.msg})") from None
    return profile_from_mapping(data, str(path))


def profile_from_mapping(data: object, where: str) -> Profile:
    """A :class:`Profile` from a JSON object; the message names the missing or odd field."""
    if not isinstance(data, dict):
        raise InvalidParamsError(f"{where}: a profile must be a JSON object")
    names = [f.name for f in fields(Profile)]
    missing = [n for n in names if n not in data]
    extra = sorted(k for k in data if k not in names)
    if missing or extra:
        raise InvalidParamsError(f"{where}: field {(missing or extra)[0]!r} is "
                                 f"{'missing' if missing else 'not a profile field'}")
    for field in fields(Profile):
        value = data[field.name]
        kind = str if field.type == "str" else int if field.type == "int" else (int, float)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InvalidParamsError(f"{where}: field {field.name!r} must be {field.type}, "
                                     f"got {value!r}")
    return Profile(**data)


def fit_profile(rows: Iterable[Mapping[str, Any]], base: Profile = SMOLLM2_CPU,
                name: str = "fitted") -> Profile:
    """``base`` with its per-token prefill and its decode step coefficients fitted to the
    ``kvcake bench engine --json`` rows of system ``kvcake``.

    A prefill row is ``batch`` prompts of ``prompt_len`` tokens computed in ``seconds``, in
    steps of ``base.prefill_chunk_tokens``: per token = (seconds - steps·fixed) / tokens,
    median over rows. A decode row is ``new_tokens - 1`` steps of ``batch`` requests: step
    time = fixed + per_request·batch by least squares over rows. What one prompt length
    cannot pin (the attention and per-context-token terms) keeps ``base``'s value.
    """
    prefill, decode = [], []
    for row in rows:
        if row.get("system") == "kvcake" and row.get("phase") == "prefill":
            prefill.append(_prefill_per_token(row, base))
        elif row.get("system") == "kvcake" and row.get("phase") == "decode":
            steps = max(1, int(row["new_tokens"]) - 1)
            decode.append((float(row["batch"]), float(row["seconds"]) / steps))
    if not prefill or len({batch for batch, _ in decode}) < 2:
        raise InvalidParamsError("need kvcake prefill rows and decode rows of at least two "
                                 "batch sizes (kvcake bench engine --json)")
    d_fixed, d_request = _line_fit(decode)
    return replace(base, name=name, description=f"fitted from kvcake bench engine ({base.name})",
                   prefill_per_token_s=statistics.median(prefill),
                   decode_fixed_s=max(0.0, d_fixed), decode_per_request_s=max(0.0, d_request))


def _prefill_per_token(row: Mapping[str, Any], base: Profile) -> float:
    tokens = int(row["batch"]) * int(row["prompt_len"])
    steps = -(-tokens // base.prefill_chunk_tokens)
    return max(0.0, float(row["seconds"]) - steps * base.prefill_fixed_s) / tokens


def _line_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``y = a + b·x``."""
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return mean_y - slope * mean_x, slope
