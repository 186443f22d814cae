"""Convert a llama.cpp GGUF file into an HF-style model directory.

    model.gguf ──► model.safetensors       float32, HF tensor names, q/k rows in HF's RoPE order
               ├─► config.json             ModelConfig.to_hf()
               ├─► tokenizer.json          byte-level BPE rebuilt from tokenizer.ggml.*
               └─► tokenizer_config.json   chat template, special tokens, add_bos_token

Quantized tensors are dequantized once, here, so the engine only ever loads plain float
weights. llama.cpp's converter reorders the rows of ``attn_q``/``attn_k`` of llama-family models
for its interleaved RoPE; :func:`unpermute_rope_rows` restores HF's half-split order.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from kvcake.common.config import GiB
from kvcake.common.errors import InvalidParamsError
from kvcake.model.config import ModelConfig
from kvcake.text import byte_level_bpe

MAX_SHARD_BYTES = 2 * GiB

# llama.cpp's name of a per-layer tensor -> the HF module path inside ``model.layers.{i}``.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
ROPE_FREQS = "rope_freqs.weight"  # llama3 RoPE scaling, folded into config.json instead

_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write the HF-style directory of ``gguf_path`` into ``out_dir`` (created if needed).

    Raises InvalidParamsError for an unreadable file, an unsupported architecture, tokenizer
    or tensor type, naming the file and the offending key or tensor.
    """
    meta = GGUFMetadata(gguf_path)
    config = model_config(meta)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, MAX_SHARD_BYTES)
    for name, array in hf_tensors(meta, config):
        writer.add(name, array)
    writer.close()
    _write_json(out_dir / "config.json", config.to_hf())
    build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(meta, config))


class ShardWriter:
    """Saves tensors, in the order given, into safetensors files of at most ``max_shard_bytes``.

    One shard is ``model.safetensors``; more are ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``, as HF writes them.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self._dir = out_dir
        self._max_bytes = max_shard_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._total_bytes = 0
        self._shards: list[list[str]] = []  # tensor names in each shard written

    def add(self, name: str, array: np.ndarray) -> None:
        if self._pending and self._pending_bytes + array.nbytes > self._max_bytes:
            self._flush()
        self._pending[name] = array
        self._pending_bytes += array.nbytes

    def close(self) -> None:
        self._flush()
        count = len(self._shards)
        if count == 1:
            os.rename(self._partial(0), self._dir / "model.safetensors")
            return
        weight_map: dict[str, str] = {}
        for index, names in enumerate(self._shards):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.rename(self._partial(index), self._dir / final)
            weight_map.update(dict.fromkeys(names, final))
        _write_json(self._dir / "model.safetensors.index.json",
                    {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map})

    def _flush(self) -> None:
        save_file(self._pending, str(self._partial(len(self._shards))), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def _partial(self, index: int) -> Path:
        return self._dir / f"shard-{index:05d}.partial"


class GGUFMetadata:
    """The key/value metadata and tensors of one GGUF file, with errors that name the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.reader = gguf.GGUFReader(path, "r")
        except (ValueError, OSError, IndexError, KeyError) as err:
            raise InvalidParamsError(f"cannot read GGUF file {path} (damaged or truncated?): "
                                     f"{err}") from None
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        self.arch = str(self.require("general.architecture"))

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self.reader.fields:
            raise InvalidParamsError(f"GGUF file {self.path} lacks metadata key {key!r}")
        return self.get(key)

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        """``{architecture}.{suffix}``, e.g. ``llama.block_count``."""
        return self.get(f"{self.arch}.{suffix}", default)

    def dequantized(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 in numpy (row-major, HF) shape."""
        tensor = self.tensors[name]
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise InvalidParamsError(
                f"GGUF file {self.path}: tensor {name!r} has type {tensor.tensor_type.name}, "
                "which cannot be dequantized (use F32/F16/BF16, Q4_0..Q8_0 or a K-quant)"
            ) from None
        shape = tuple(int(dim) for dim in reversed(tensor.shape))
        return np.asarray(values, dtype=np.float32).reshape(shape)


def model_config(meta: GGUFMetadata) -> ModelConfig:
    """The architecture of the GGUF model, as kvcake's (HF-compatible) ModelConfig."""
    fields = _config_fields(meta)
    try:
        return ModelConfig(**fields)
    except InvalidParamsError as err:
        raise InvalidParamsError(f"GGUF file {meta.path}: {err.args[0]}") from None


def _config_fields(meta: GGUFMetadata) -> dict[str, Any]:
    model_type = _model_type(meta)
    heads = int(_required_arch_key(meta, "attention.head_count"))
    hidden = int(_required_arch_key(meta, "embedding_length"))
    head_dim = int(meta.arch_key("attention.key_length", hidden // heads))
    theta = float(meta.arch_key("rope.freq_base", 10000.0))
    rope_dim = int(meta.arch_key("rope.dimension_count", head_dim))
    return {
        "model_type": model_type,
        "vocab_size": int(meta.tensors["token_embd.weight"].shape[1]),
        "hidden_size": hidden,
        "intermediate_size": int(_required_arch_key(meta, "feed_forward_length")),
        "num_layers": int(_required_arch_key(meta, "block_count")),
        "num_heads": heads,
        "num_kv_heads": int(meta.arch_key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta.arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "max_position_embeddings": int(meta.arch_key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in meta.tensors,
        "attention_bias": "blk.0.attn_q.bias" in meta.tensors,
        "rope_scaling": rope_scaling(meta, theta, rope_dim),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_ids": _eos_ids(meta),
    }


def _model_type(meta: GGUFMetadata) -> str:
    if "token_embd.weight" not in meta.tensors:
        raise InvalidParamsError(f"GGUF file {meta.path} has no token_embd.weight tensor")
    if meta.arch == "qwen2":
        return "qwen2"
    if meta.arch != "llama":
        raise InvalidParamsError(f"GGUF file {meta.path}: architecture {meta.arch!r} is not "
                                 "supported (supported: llama, qwen2)")
    # llama.cpp files Mistral models under "llama"; only the name tells them apart.
    return "mistral" if "mistral" in str(meta.get("general.name", "")).lower() else "llama"


def _required_arch_key(meta: GGUFMetadata, suffix: str) -> Any:
    return meta.require(f"{meta.arch}.{suffix}")


def _eos_ids(meta: GGUFMetadata) -> tuple[int, ...]:
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    found = [meta.get(f"tokenizer.ggml.{key}") for key in keys]
    return tuple(dict.fromkeys(int(token_id) for token_id in found if token_id is not None))


def rope_scaling(meta: GGUFMetadata, theta: float, rope_dim: int) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``{arch}.rope.scaling.*`` keys or a ``rope_freqs`` tensor."""
    if ROPE_FREQS in meta.tensors:
        try:
            return llama3_scaling(meta.dequantized(ROPE_FREQS), theta, rope_dim)
        except InvalidParamsError as err:
            raise InvalidParamsError(f"GGUF file {meta.path}: {err.args[0]}") from None
    kind = meta.arch_key("rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": str(kind),
                               "factor": float(_required_arch_key(meta, "rope.scaling.factor"))}
    original = meta.arch_key("rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def llama3_scaling(divisors: np.ndarray, theta: float, rope_dim: int) -> dict[str, Any]:
    """Recover llama3 ``rope_scaling`` from llama.cpp's per-frequency divisors.

    The file keeps only the divisors; their maximum is the scaling factor, and the other
    parameters are Llama 3's published ones, checked by recomputing the divisors.
    """
    scaling = {"rope_type": "llama3", "factor": float(divisors.max()), **_LLAMA3_ROPE}
    if not np.allclose(llama3_divisors(scaling, theta, rope_dim), divisors, rtol=1e-3):
        raise InvalidParamsError(f"{ROPE_FREQS} does not match llama3 RoPE scaling "
                                 f"with {_LLAMA3_ROPE}")
    return scaling


def llama3_divisors(scaling: dict[str, Any], theta: float, rope_dim: int) -> np.ndarray:
    """How much llama3 scaling divides each RoPE frequency by: 1 (fast) .. factor (slow)."""
    inv_freq = 1.0 / theta ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    wavelen = 2 * np.pi / inv_freq
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (scaling["original_max_position_embeddings"] / wavelen - low) / (high - low)
    smooth = np.clip(smooth, 0.0, 1.0)
    return np.asarray(1.0 / ((1.0 - smooth) / scaling["factor"] + smooth), dtype=np.float32)


def hf_tensors(meta: GGUFMetadata, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Each weight under its HF name, dequantized, in HF layout."""
    for gguf_name in meta.tensors:
        if gguf_name == ROPE_FREQS:
            continue
        name = hf_name(gguf_name)
        if name is None:
            raise InvalidParamsError(f"GGUF file {meta.path}: tensor {gguf_name!r} has no "
                                     "counterpart in a llama/qwen2 model")
        yield name, _hf_layout(name, meta.dequantized(gguf_name), config)


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None: unknown)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _hf_layout(name: str, array: np.ndarray, config: ModelConfig) -> np.ndarray:
    if config.model_type == "qwen2":  # llama.cpp keeps Qwen2's q/k rows as they are
        return array
    if ".q_proj." in name:
        return unpermute_rope_rows(array, config.num_heads)
    if ".k_proj." in name:
        return unpermute_rope_rows(array, config.num_kv_heads)
    return array


def unpermute_rope_rows(array: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order.

    Within each head HF keeps the RoPE pairs as two halves (x0..x63 | x64..x127 rotate
    together pairwise across the halves); llama.cpp interleaves them (x0 x64 x1 x65 ...).
    Rows are viewed as (heads, head_dim/2, 2) and the last two axes swapped back.
    """
    rows = array.shape[0]
    half = rows // num_heads // 2
    # (num_heads, head_dim / 2, 2, *rest) -> (num_heads, 2, head_dim / 2, *rest)
    grouped = array.reshape(num_heads, half, 2, *array.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2).reshape(array.shape))


def build_tokenizer(meta: GGUFMetadata) -> Tokenizer:
    """The byte-level BPE tokenizer that ``tokenizer.ggml.*`` describes."""
    kind = meta.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise InvalidParamsError(f"GGUF file {meta.path}: tokenizer model {kind!r} is not "
                                 "supported (supported: 'gpt2', byte-level BPE)")
    add = {key: meta.get(f"tokenizer.ggml.{key}_token_id")
           if meta.get(f"tokenizer.ggml.add_{key}_token") else None for key in ("bos", "eos")}
    return byte_level_bpe(
        meta.require("tokenizer.ggml.tokens"), meta.require("tokenizer.ggml.merges"),
        meta.get("tokenizer.ggml.token_type") or [], pre=meta.get("tokenizer.ggml.pre"),
        bos_id=add["bos"], eos_id=add["eos"])


def tokenizer_config(meta: GGUFMetadata, config: ModelConfig) -> dict[str, Any]:
    """``tokenizer_config.json``: special tokens by spelling, chat template, BOS/EOS flags."""
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        out[f"{name}_token"] = None if token_id is None else tokens[int(token_id)]
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
