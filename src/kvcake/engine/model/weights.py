"""Loading a model's weights into torch tensors (the files are found by
:mod:`kvcake.model.files`)."""

from __future__ import annotations

import torch
from safetensors import SafetensorError, safe_open

from kvcake.common.errors import InvalidParamsError
from kvcake.model import ModelFiles, safetensors_files


def load_weights(files: ModelFiles, dtype: torch.dtype,
                 device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of ``files`` under their HF names, cast to ``dtype`` on ``device``.

    Tied embeddings stay tied: no ``lm_head.weight`` is invented when the files lack one.
    """
    weights: dict[str, torch.Tensor] = {}
    for path in safetensors_files(files.path):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    weights[name] = handle.get_tensor(name).to(dtype).to(device)
        except (SafetensorError, OSError) as err:
            raise InvalidParamsError(f"cannot load weights from {path}: {err}") from None
    return weights
