"""kvcake's CPU kernels (``kernels.c``), compiled at first use: paged decode and prefill
attention, the fused element-wise steps of a layer, and greedy sampling.

PyTorch has no kernel that attends over a paged cache, so the ``sdpa`` path first gathers
every decode's context into a padded copy (``index_select``) and then runs a fused kernel
built for long queries. For single-token decodes both are mostly overhead: at batch 32 the
gather and the kernel took about 40 % of a step. :meth:`CpuKernels.paged_decode` walks each
sequence's block table instead and reads every K/V row once. :meth:`CpuKernels.paged_prefill`
does the same for prompt chunks, tiles of query rows sharing each K/V row they read: against
``sdpa`` per chunk, attention over 32 prompts of 128 tokens took 1.6-1.8x less time, and a
16-token chunk after a 4,080-token prefix (a store hit's last block) 1.1x less, without the
gathered copy of its context (bf16, 2 threads; about even at 2,048 tokens and more). The
element-wise steps (residual add + RMSNorm, rotary embedding, SiLU-and-multiply) replace 5-10
PyTorch ops each, which in bf16 on a CPU each pass over the activations once more, in one pass
that rounds where those ops rounded (see the C file's header). :meth:`CpuKernels.greedy`
picks each row's argmax and its log-probability in two passes over the logits, where the
sampler's PyTorch ops take six (about 3 ms a step at batch 32 over SmolLM2's 49,152 tokens).

The file is compiled with the system's C compiler (``$CC``, else ``cc``) for this machine
(``-march=native``) and for one model shape and dtype, then kept in ``<cache>/kernels`` under
a name that hashes the source, flags and CPU, so later starts only load it. OpenMP threads
come from the libgomp torch has already loaded (one thread pool in the process). Where no
compiler is found or the build fails, :func:`load_cpu_kernels` says why once and returns
``None``, and the model keeps PyTorch's ops (and gathers K/V for ``sdpa``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
# -ffast-math vectorises expf (through glibc's libmvec) and the dot products' reductions. It is
# given to the compile step only: linked with it, gcc adds start-up code that sets the CPU's
# flush-to-zero mode for the whole process, torch's arithmetic included.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c")
LINK_FLAGS = ("-shared", "-fopenmp")
LIBRARIES = ("-lmvec", "-lm")
ELEMENTS = {torch.bfloat16: "KV_BF16", torch.float16: "KV_F16", torch.float32: "KV_F32"}
MAX_HEAD_DIM = 512  # the attention kernel keeps GROUPS x HEAD_DIM floats per thread on its stack
MAX_GROUPS = 16
COMPILE_TIMEOUT_S = 120
UNAVAILABLE = "kvcake's CPU kernels unavailable (%s); the model runs on PyTorch's ops"

_POINTER, _INT, _INT64, _FLOAT = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "kvcake_paged_decode": [_POINTER] * 6 + [_INT] * 4 + [_FLOAT, _INT],
    "kvcake_paged_prefill": [_POINTER] * 7 + [_INT] * 4 + [_FLOAT, _INT],
    "kvcake_add_rms_norm": [_POINTER] * 4 + [_INT, _INT, _FLOAT, _INT],
    "kvcake_rope": [_POINTER, _INT64, _POINTER, _POINTER, _POINTER, _POINTER] + [_INT] * 4,
    "kvcake_silu_mul": [_POINTER, _POINTER, _INT, _INT, _INT],
    "kvcake_greedy": [_POINTER, _INT, _INT64, _POINTER, _POINTER, _INT],
}


@dataclass(frozen=True)
class PagedDecodes:
    """Single-token decodes at flat indices ``start .. start + n`` for the paged kernel.

    tables: each decode's block ids, padded with 0, ``(n, width)`` int32.
    lens: each decode's context length, its own new token included, ``(n,)`` int32.
    block_size: tokens per block of the cache.
    """

    start: int
    tables: torch.Tensor
    lens: torch.Tensor
    block_size: int

    @property
    def count(self) -> int:
        return int(self.lens.shape[0])


@dataclass(frozen=True)
class PagedPrefills:
    """Prompt chunks at the flat batch's start, back to back, for the paged kernel.

    tables: each chunk's block ids, padded with 0, ``(n, width)`` int32.
    firsts: the position of each chunk's first token (the tokens cached before it), ``(n,)``.
    lengths: each chunk's number of tokens, ``(n,)`` int32.
    block_size: tokens per block of the cache.
    """

    tables: torch.Tensor
    firsts: torch.Tensor
    lengths: torch.Tensor
    block_size: int


class CpuKernels:
    """The compiled kernels for one (dtype, head_dim, query heads per K/V head). Every call
    takes contiguous tensors of that dtype and runs without the GIL."""

    def __init__(self, library: ctypes.CDLL, dtype: torch.dtype, head_dim: int,
                 groups: int) -> None:
        self.dtype, self.head_dim, self.groups = dtype, head_dim, groups
        self._library = library  # keeps the shared object loaded
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, None
        self._decode = library.kvcake_paged_decode
        self._prefill = library.kvcake_paged_prefill
        self._norm = library.kvcake_add_rms_norm
        self._rope = library.kvcake_rope
        self._silu_mul = library.kvcake_silu_mul
        self._greedy = library.kvcake_greedy

    def paged_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     decodes: PagedDecodes, scale: float, out: torch.Tensor) -> None:
        """``out`` (n, heads, head_dim) = attention of ``q`` (the same shape) over the
        layer's ``k`` and ``v`` (slots, kv_heads, head_dim)."""
        n, width = decodes.tables.shape
        self._decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), decodes.tables.data_ptr(),
                     decodes.lens.data_ptr(), out.data_ptr(), n, k.shape[1], width,
                     decodes.block_size, scale, torch.get_num_threads())

    def paged_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      prefills: PagedPrefills, scale: float, out: torch.Tensor) -> None:
        """``out[:n]`` = causal attention of the first ``n`` rows of ``q`` (the chunks' tokens,
        ``(n, heads, head_dim)``) over each chunk's cached prefix and its own tokens."""
        chunks, width = prefills.tables.shape
        self._prefill(q.data_ptr(), k.data_ptr(), v.data_ptr(), prefills.tables.data_ptr(),
                      prefills.firsts.data_ptr(), prefills.lengths.data_ptr(), out.data_ptr(),
                      chunks, k.shape[1], width, prefills.block_size, scale,
                      torch.get_num_threads())

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """``x += delta`` in place (when given), then RMSNorm of ``x`` times ``weight``."""
        out = torch.empty_like(x)
        rows, hidden = x.shape
        self._norm(x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                   out.data_ptr(), rows, hidden, eps, torch.get_num_threads())
        return out

    def rope(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
             kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated q ``(rows, heads, head_dim)`` and k ``(rows, kv_heads, head_dim)`` from
        the q and k parts of each ``qkv`` row."""
        rows = qkv.shape[0]
        q = qkv.new_empty(rows, heads, self.head_dim)
        k = qkv.new_empty(rows, kv_heads, self.head_dim)
        self._rope(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), q.data_ptr(),
                   k.data_ptr(), rows, heads, kv_heads, torch.get_num_threads())
        return q, k

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` where each row of ``gate_up`` is ``[gate | up]``."""
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        out = gate_up.new_empty(rows, width)
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, width,
                       torch.get_num_threads())
        return out

    def greedy(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's argmax (int64, the first on ties) and its log-probability (float32)
        for contiguous float32 ``logits`` ``(rows, vocab)``."""
        rows, vocab = logits.shape
        ids = torch.empty(rows, dtype=torch.int64)
        logprobs = torch.empty(rows, dtype=torch.float32)
        self._greedy(logits.data_ptr(), rows, vocab, ids.data_ptr(), logprobs.data_ptr(),
                     torch.get_num_threads())
        return ids, logprobs


def load_cpu_kernels(dtype: torch.dtype, head_dim: int, groups: int,
                     cache_dir: Path) -> CpuKernels | None:
    """The kernels for this shape, compiled into ``cache_dir`` if not there yet; ``None``
    (and one warning naming why) where they cannot be built for this model or machine."""
    reason = _unsupported(dtype, head_dim, groups)
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if reason is None and compiler is None:
        reason = "no C compiler found ($CC or cc)"
    if reason is not None or compiler is None:
        log.warning(UNAVAILABLE, reason)
        return None
    defines = (f"-DHEAD_DIM={head_dim}", f"-DGROUPS={groups}", f"-D{ELEMENTS[dtype]}")
    target = cache_dir / "kernels" / f"kernels-{_build_key(compiler, defines)}.so"
    try:
        if not target.exists():
            _compile(compiler, defines, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning(UNAVAILABLE, _first_line(exc))
        return None
    return CpuKernels(library, dtype, head_dim, groups)


def _unsupported(dtype: torch.dtype, head_dim: int, groups: int) -> str | None:
    if dtype not in ELEMENTS:
        return f"dtype {dtype} is not one of {', '.join(map(str, ELEMENTS))}"
    if not 2 <= head_dim <= MAX_HEAD_DIM or head_dim % 2 or not 1 <= groups <= MAX_GROUPS:
        return f"head_dim {head_dim} or {groups} query heads per K/V head is out of range"
    return None


def _build_key(compiler: str, defines: tuple[str, ...]) -> str:
    """Source, flags, compiler and CPU: a build for another machine is never reused."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    machine = (compiler, platform.machine(), _cpu_flags())
    for part in (*COMPILE_FLAGS, *LINK_FLAGS, *LIBRARIES, *defines, *machine):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:20]


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def _compile(compiler: str, defines: tuple[str, ...], target: Path) -> None:
    """Build into files of this process's own, then rename into place (atomic: several
    processes starting at once each build, and the last rename wins with equal bytes)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    obj = partial.with_suffix(".o")
    try:
        _run([compiler, *COMPILE_FLAGS, *defines, str(SOURCE), "-o", str(obj)])
        _run([compiler, *LINK_FLAGS, str(obj), "-o", str(partial), *LIBRARIES])
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
        obj.unlink(missing_ok=True)


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S,
                          check=False)
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()
        raise OSError(f"{command[0]} failed with exit code {done.returncode}"
                      + (f": {said[0]}" if said else ""))


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
