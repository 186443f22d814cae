"""The inference engine's settings (``KVCAKE_ENGINE_*``) and its dtype choice. Imports no
torch: ``kvcake up``, the Conductor and the CLI read it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from kvcake.common.config import MiB, check_at_least, check_within, require
from kvcake.store.config import DEFAULT_TENANT, check_tenant_name

DTYPE_CHOICES = ("auto", "bfloat16", "float32", "float16")
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX512/AMX, Arm


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 itself. Without it torch emulates bf16 matmuls
    several times slower than float32 (measured on an AVX2-only EPYC: 4.6x)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    flags = {flag for line in lines if line.startswith(("flags", "Features"))
             for flag in line.partition(":")[2].split()}
    return bool(flags & _NATIVE_BF16_FLAGS)


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: bfloat16 on an accelerator or a CPU with native bf16, else float32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device != "cpu" or cpu_has_native_bf16() else "float32"


ATTENTION_CHOICES = ("paged", "sdpa", "eager")


@dataclass(frozen=True)
class EngineConfig:
    """Inference engine settings (``KVCAKE_ENGINE_*``).

    model: ``smollm2`` (the packaged SmolLM2-135M-Instruct), a ``.gguf`` file, or a directory
        with ``config.json`` and ``*.safetensors``.
    dtype: weights, activations and KV cache (``bfloat16``, ``float32``, ``float16``, or
        ``auto``: bfloat16 on a GPU or a CPU that computes it natively, else float32; resolved
        when the config is made, so peers compare the dtype actually used).
    device: torch device (``cpu``, ``cuda``, ``cuda:1``).
    attention: kernel (``paged``: compiled kernels that read the K/V blocks in place for
        prompt chunks and decodes, fastest on CPU, ``sdpa`` where they cannot be built;
        ``sdpa``: PyTorch's fused kernels over gathered K/V; ``eager``: HF's exact math, for
        bit-faithful comparisons).
    block_size: tokens per KV block (a multiple of 8 is fastest; 1..1024).
    kv_cache_bytes: bytes of the paged KV pool (its block count follows from the model).
    max_num_seqs: most requests running at once.
    max_num_batched_tokens: token budget of one step (prefill chunks plus decodes).
    max_model_len: longest prompt plus output (0 = the model's own limit).
    cache_dir: where converted weights and compiled kernels are kept (empty =
        ``~/.cache/kvcake``).
    tenant: namespace of this engine's KV blocks in the store.
    store_master: ``HOST:PORT`` of a kvcake store master (empty = no store connector).
    store_segment_size: bytes this engine contributes to the store pool (0 = a pure client).
    seed: seed for requests that do not give their own (0 = from the OS).
    threads: torch intra-op threads (0 = torch's default).
    plain_prefill_weights: keep float32 weights plain beside oneDNN's packed copy (on a CPU)
        for long steps, where plain matmuls are faster (384 tokens or more with 2 threads,
        64 with one); the linear layers then take twice their memory (a decode-only
        instance needs no plain copy).
    """

    model: str = "smollm2"
    dtype: str = "auto"
    device: str = "cpu"
    attention: str = "paged"
    block_size: int = 16
    kv_cache_bytes: int = 512 * MiB
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 0
    cache_dir: str = ""
    tenant: str = DEFAULT_TENANT
    store_master: str = ""
    store_segment_size: int = 0
    seed: int = 0
    threads: int = 0
    plain_prefill_weights: bool = True

    def __post_init__(self) -> None:
        require(self.dtype in DTYPE_CHOICES, f"dtype must be one of {DTYPE_CHOICES}, "
                f"got {self.dtype!r}")
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        require(self.attention in ATTENTION_CHOICES, f"attention must be one of "
                f"{ATTENTION_CHOICES}, got {self.attention!r}")
        check_within(self, 1, 1024, "block_size")
        check_at_least(self, 0, "kv_cache_bytes", above=True)
        check_at_least(self, 1, "max_num_seqs")
        check_at_least(self, 0, "max_model_len", "threads")
        require(self.max_num_batched_tokens >= self.block_size,
                f"max_num_batched_tokens must be >= block_size, got "
                f"{self.max_num_batched_tokens}")
        check_tenant_name(self.tenant)
        require(not self.store_master or ":" in self.store_master,
                f"store_master must be HOST:PORT, got {self.store_master!r}")
