"""Decode attention that reads K/V blocks in place: ``paged_decode.c``, compiled at first use.

PyTorch has no kernel that attends over a paged cache, so the ``sdpa`` path first gathers
every decode's context into a padded copy (``index_select``) and then runs a fused kernel
built for long queries. For single-token decodes both are mostly overhead: at batch 32 the
gather and the kernel took about 40 % of a step. The C kernel walks each sequence's block
table instead and reads every K/V row once (see the file's header for the algorithm).

It is compiled with the system's C compiler (``$CC``, else ``cc``) for this machine
(``-march=native``) and for one model shape and dtype, then kept in ``<cache>/kernels``
under a name that hashes the source, flags and CPU, so later starts only load it. OpenMP
threads come from the libgomp torch has already loaded (one thread pool in the process).
Where no compiler is found or the build fails, :func:`load_paged_decode` says why once and
returns ``None``, and the model keeps the gather-and-``sdpa`` path.
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

SOURCE = Path(__file__).with_name("paged_decode.c")
# -ffast-math vectorises expf (through glibc's libmvec) and the dot products' reductions. It is
# given to the compile step only: linked with it, gcc adds start-up code that sets the CPU's
# flush-to-zero mode for the whole process, torch's arithmetic included.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c")
LINK_FLAGS = ("-shared", "-fopenmp")
LIBRARIES = ("-lmvec", "-lm")
ELEMENTS = {torch.bfloat16: "KV_BF16", torch.float16: "KV_F16", torch.float32: "KV_F32"}
MAX_HEAD_DIM = 512  # the kernel keeps GROUPS x HEAD_DIM floats per thread on its stack
MAX_GROUPS = 16
COMPILE_TIMEOUT_S = 120


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


class PagedDecodeKernel:
    """The compiled kernel for one (dtype, head_dim, groups)."""

    def __init__(self, library: ctypes.CDLL, dtype: torch.dtype, head_dim: int,
                 groups: int) -> None:
        self.dtype, self.head_dim, self.groups = dtype, head_dim, groups
        self._library = library  # keeps the shared object loaded
        self._fn = library.kvcake_paged_decode
        pointer, number = ctypes.c_void_p, ctypes.c_int
        self._fn.argtypes = [pointer] * 6 + [number] * 4 + [ctypes.c_float, number]
        self._fn.restype = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 decodes: PagedDecodes, scale: float, out: torch.Tensor) -> None:
        """``out`` (n, heads, head_dim) = attention of ``q`` (the same shape, contiguous)
        over the layer's ``k`` and ``v`` (slots, kv_heads, head_dim); runs without the GIL."""
        n, width = decodes.tables.shape
        self._fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), decodes.tables.data_ptr(),
                 decodes.lens.data_ptr(), out.data_ptr(), n, k.shape[1], width,
                 decodes.block_size, scale, torch.get_num_threads())


def load_paged_decode(dtype: torch.dtype, head_dim: int, groups: int,
                      cache_dir: Path) -> PagedDecodeKernel | None:
    """The kernel for this shape, compiled into ``cache_dir`` if not there yet; ``None``
    (and one warning naming why) where it cannot be built for this model or machine."""
    reason = _unsupported(dtype, head_dim, groups)
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if reason is None and compiler is None:
        reason = "no C compiler found ($CC or cc)"
    if reason is not None or compiler is None:
        log.warning("paged decode attention unavailable (%s); decodes gather K/V for sdpa",
                    reason)
        return None
    defines = (f"-DHEAD_DIM={head_dim}", f"-DGROUPS={groups}", f"-D{ELEMENTS[dtype]}")
    target = cache_dir / "kernels" / f"paged_decode-{_build_key(compiler, defines)}.so"
    try:
        if not target.exists():
            _compile(compiler, defines, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("paged decode attention unavailable (%s); decodes gather K/V for sdpa",
                    _first_line(exc))
        return None
    return PagedDecodeKernel(library, dtype, head_dim, groups)


def _unsupported(dtype: torch.dtype, head_dim: int, groups: int) -> str | None:
    if dtype not in ELEMENTS:
        return f"dtype {dtype} is not one of {', '.join(map(str, ELEMENTS))}"
    if not 1 <= head_dim <= MAX_HEAD_DIM or not 1 <= groups <= MAX_GROUPS:
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
    """Build into a file of this process's own, then rename it into place (atomic: several
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
