"""Rotary position tables: plain RoPE and the ``linear`` and ``llama3`` frequency scalings.

Tables are float32 ``(max_positions, head_dim)`` in the rotate-half layout (the two halves
repeat the same frequencies), computed exactly as HF transformers does so that logits agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from kvcake.model import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """``(head_dim // 2,)`` float32 angular frequencies after any scaling."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if config.rope_type == "llama3":
        return _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    # long wavelengths are slowed by `factor`, short ones kept, the band between blended
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_tables(config: ModelConfig, device: torch.device,
                max_positions: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each float32 ``(max_positions, head_dim)``."""
    count = max_positions or config.max_position_embeddings
    inv_freq = inverse_frequencies(config)
    positions = torch.arange(count, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]  # (count, head_dim // 2)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(device), angles.sin().to(device)
