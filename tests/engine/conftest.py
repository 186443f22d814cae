"""Engine fixtures: the packaged model (converted once per machine), HF references, and tiny
random models, as a safetensors directory or as a GGUF file written the way llama.cpp does."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kvcake.model import PACKAGED_MODEL, ModelConfig, ModelFiles, packaged_gguf, resolve_model
from kvcake.text import Tokenizer, byte_alphabet

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network from tests

TINY_CONFIG = ModelConfig(
    model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=512, bos_token_id=1, eos_token_ids=(2,),
)

# The tiny GGUF vocabulary: three control tokens, the 256 byte symbols, three merges and a
# user-defined token.
TINY_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he"]
TINY_USER = ["<think>"]
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                      "assistant\n{% endif %}")

_LAYER_PARTS = {  # HF module -> llama.cpp tensor, written here independently of convert.py
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded float32 weights under HF names; linear layers scaled by 1/sqrt(fan_in) so
    activations stay near unit size through the layers."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = config.hidden_size, config.intermediate_size
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}."
        shapes |= {
            prefix + "self_attn.q_proj.weight": (q_rows, hidden),
            prefix + "self_attn.k_proj.weight": (kv_rows, hidden),
            prefix + "self_attn.v_proj.weight": (kv_rows, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, q_rows),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        }
        if config.attention_bias:
            shapes |= {prefix + "self_attn.q_proj.bias": (q_rows,),
                       prefix + "self_attn.k_proj.bias": (kv_rows,),
                       prefix + "self_attn.v_proj.bias": (kv_rows,)}
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return {name: _random(shape, name, gen) for name, shape in shapes.items()}


def _random(shape: tuple[int, ...], name: str, gen: torch.Generator) -> torch.Tensor:
    values = torch.randn(*shape, generator=gen)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * values
    if name.endswith(".bias"):
        return 0.1 * values
    return values if "embed" in name else values / shape[-1] ** 0.5


def write_model_dir(path: Path, config: ModelConfig, weights: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def smollm2_files() -> ModelFiles:
    """The packaged model, converted into the default cache (once per machine)."""
    return resolve_model(PACKAGED_MODEL)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_files: ModelFiles) -> Tokenizer:
    """Our tokenizer of the packaged model (from its converted directory)."""
    return Tokenizer.from_dir(smollm2_files.path)


@pytest.fixture(scope="session")
def hf_tokenizer() -> Any:
    """transformers' own tokenizer built from the packaged GGUF (the reference)."""
    transformers = pytest.importorskip("transformers")
    path = packaged_gguf()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def hf_model_fp32(smollm2_files: ModelFiles) -> Any:
    """transformers' Llama loaded from our converted directory, float32, eval mode."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_files.path,
                                                              dtype=torch.float32)
    return model.eval()


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Callable[..., Path]:
    """``make(seed=0, name="tiny", **config_overrides) -> Path``: config.json and
    model.safetensors of a tiny random Llama (2 layers, hidden 64, 4 heads, 2 KV heads,
    vocab 256); overrides are ModelConfig fields."""

    def make(seed: int = 0, name: str = "tiny", **overrides: Any) -> Path:
        config = replace(TINY_CONFIG, **overrides)
        return write_model_dir(tmp_path / name, config, random_weights(config, seed))

    return make


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Callable[..., tuple[Path, dict[str, torch.Tensor]]]:
    """``make(arch="llama", name="tiny.gguf", seed=0, tensors=None, **metadata)`` ->
    ``(path, weights)``: a float32 GGUF of a tiny random model as llama.cpp writes it (q/k
    rows permuted for llama), with a byte-level vocabulary; ``weights`` are the HF-layout
    originals. ``tensors`` (by GGUF name) and ``metadata`` entries replace or add to what is
    written; a metadata value of None drops the key."""

    def make(arch: str = "llama", name: str = "tiny.gguf", seed: int = 0,
             tensors: dict[str, np.ndarray] | None = None,
             **metadata: Any) -> tuple[Path, dict[str, torch.Tensor]]:
        config = replace(TINY_CONFIG, model_type="qwen2" if arch == "qwen2" else "llama",
                         vocab_size=len(tiny_vocab()[0]), attention_bias=arch == "qwen2")
        weights = random_weights(config, seed)
        path = tmp_path / name
        _write_gguf(path, arch, config, weights, tensors or {}, metadata)
        return path, weights

    return make


def tiny_vocab() -> tuple[list[str], list[int]]:
    """Tokens and llama.cpp token types of the tiny GGUF vocabulary."""
    merged = ["".join(merge.split(" ")) for merge in TINY_MERGES]
    tokens = TINY_CONTROL + list(byte_alphabet().values()) + merged + TINY_USER
    types = [3] * len(TINY_CONTROL) + [1] * (256 + len(merged)) + [4] * len(TINY_USER)
    return tokens, types


def llama_cpp_permute(array: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows: per head, interleave the two RoPE halves."""
    half = array.shape[0] // num_heads // 2
    grouped = array.reshape(num_heads, 2, half, *array.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2).reshape(array.shape))


def _gguf_name(hf_name: str) -> str:
    globals_ = {"model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in globals_:
        return globals_[hf_name]
    _, _, layer, *module, kind = hf_name.split(".")
    return f"blk.{layer}.{_LAYER_PARTS['.'.join(module)]}.{kind}"


def _gguf_layout(hf_name: str, array: np.ndarray, config: ModelConfig) -> np.ndarray:
    if config.model_type != "llama":
        return array
    if ".q_proj." in hf_name:
        return llama_cpp_permute(array, config.num_heads)
    if ".k_proj." in hf_name:
        return llama_cpp_permute(array, config.num_kv_heads)
    return array


def _gguf_metadata(arch: str, config: ModelConfig) -> dict[str, Any]:
    tokens, types = tiny_vocab()
    return {
        f"{arch}.block_count": config.num_layers,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": config.num_heads,
        f"{arch}.attention.head_count_kv": config.num_kv_heads,
        f"{arch}.rope.freq_base": config.rope_theta,
        f"{arch}.attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": TINY_MERGES,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": TINY_CHAT_TEMPLATE,
    }


def _write_gguf(path: Path, arch: str, config: ModelConfig, weights: dict[str, torch.Tensor],
                tensors: dict[str, np.ndarray], overrides: dict[str, Any]) -> None:
    writer = gguf.GGUFWriter(path, arch)  # writes general.architecture itself
    metadata = _gguf_metadata(arch, config) | overrides
    for key, value in metadata.items():
        if value is not None:
            _add_value(writer, key, value)
    arrays = {_gguf_name(name): _gguf_layout(name, tensor.numpy(), config)
              for name, tensor in weights.items()}
    for name, array in (arrays | tensors).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)
