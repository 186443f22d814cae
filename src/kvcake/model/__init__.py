"""A model's files, torch-free: a spec (``smollm2``, a ``.gguf`` file, a safetensors
directory) resolved to a directory with ``config.json``, weights and tokenizer files, a GGUF
converted once into the cache on the way. The engine loads the weights
(:mod:`kvcake.engine.model.weights`); the Conductor only reads the tokenizer (:mod:`kvcake.text`).
"""

from __future__ import annotations

from kvcake.model.config import ModelConfig
from kvcake.model.files import (
    PACKAGED_MODEL,
    ModelFiles,
    cache_root,
    directory_digest,
    packaged_gguf,
    resolve_model,
    safetensors_files,
)

__all__ = [
    "PACKAGED_MODEL",
    "ModelConfig",
    "ModelFiles",
    "cache_root",
    "directory_digest",
    "packaged_gguf",
    "resolve_model",
    "safetensors_files",
]
