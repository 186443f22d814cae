"""The architecture of a Llama-family model, read from (and written as) HF ``config.json``.

One frozen record covers Llama 1-3, SmolLM/SmolLM2, Mistral (no sliding window) and
Qwen2-style models: grouped-query attention, RoPE (default, ``linear`` or ``llama3`` scaling),
RMSNorm, a SwiGLU MLP, optional q/k/v biases and tied embeddings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from kvcake.common.errors import InvalidParamsError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of one model; ``head_dim`` defaults to hidden / heads."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope_scaling: Mapping[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidParamsError(f"model_type {self.model_type!r} is not supported "
                                     f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if self.num_heads % self.num_kv_heads:
            raise InvalidParamsError(f"num_heads {self.num_heads} is not a multiple of "
                                     f"num_kv_heads {self.num_kv_heads}")
        if self.rope_type not in ROPE_TYPES:
            raise InvalidParamsError(f"rope scaling {self.rope_type!r} is not supported "
                                     f"(supported: {', '.join(ROPE_TYPES)})")

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return str(scaling.get("rope_type", scaling.get("type", "default")))

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def fingerprint(self) -> str:
        """A stable digest of the architecture (weights are fingerprinted separately)."""
        text = json.dumps(asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Read an HF ``config.json`` dict; unknown keys are ignored, missing ones named."""
        try:
            return cls(**_fields_from_hf(raw))
        except KeyError as missing:
            raise InvalidParamsError(f"config.json lacks {missing.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """An HF-compatible ``config.json`` dict (transformers can load the directory)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        ids = list(self.eos_token_ids)
        eos: int | list[int] | None = (ids[0] if len(ids) == 1 else ids) if ids else None
        out: dict[str, Any] = {
            "architectures": [arch], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias, "hidden_act": "silu",
            "bos_token_id": self.bos_token_id, "eos_token_id": eos,
        }
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling)
        return out


def _fields_from_hf(raw: Mapping[str, Any]) -> dict[str, Any]:
    model_type = str(raw.get("model_type", "llama"))
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    rope = raw.get("rope_parameters") or raw.get("rope_scaling")
    theta = raw.get("rope_theta", (rope or {}).get("rope_theta", 10000.0))
    scaling = _scaling_only(rope)
    return {
        "model_type": model_type, "vocab_size": int(raw["vocab_size"]),
        "hidden_size": hidden, "intermediate_size": int(raw["intermediate_size"]),
        "num_layers": int(raw["num_hidden_layers"]), "num_heads": heads,
        "num_kv_heads": int(raw.get("num_key_value_heads") or heads),
        "head_dim": int(raw.get("head_dim") or hidden // heads),
        "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)), "rope_theta": float(theta),
        "max_position_embeddings": int(raw.get("max_position_embeddings", 2048)),
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "attention_bias": bool(raw.get("attention_bias", model_type == "qwen2")),
        "rope_scaling": scaling, "bos_token_id": raw.get("bos_token_id"),
        "eos_token_ids": eos_ids,
    }


def _scaling_only(rope: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The scaling part of ``rope_scaling`` / ``rope_parameters`` (``None`` for plain RoPE)."""
    if not rope:
        return None
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind == "default" else scaling
