"""The vLLM connector's settings (``KVCAKE_VLLM_*``, then ``kv_connector_extra_config``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvcake.common.config import MiB, check_at_least, load_config, parse_cpus, require, table_values
from kvcake.common.hosts import check_bind_host
from kvcake.engine.config import resolve_dtype
from kvcake.store.config import DEFAULT_TENANT, check_tenant_name
from kvcake.wire.conductor import ROLES

MIN_STAGING_BYTES = 128 * MiB


def staging_slots(staging_bytes: int, record_bytes: int, step_tokens: int,
                  block_size: int) -> int:
    """Records the save ring holds: ``staging_bytes`` worth, or (0) room for every block a
    step of ``step_tokens`` can fill and at least ``MIN_STAGING_BYTES``, so that while the
    store keeps up no save is dropped because one step filled more blocks than the ring
    holds (a 4,096-token float32 SmolLM2 prompt fills 32 blocks of 5.6 MiB at once)."""
    wanted = staging_bytes or max(MIN_STAGING_BYTES,
                                  (step_tokens // block_size + 1) * record_bytes)
    return max(2, wanted // record_bytes)


@dataclass(frozen=True)
class VllmConnectorConfig:
    """kvcake's store under a vLLM instance (``KVCAKE_VLLM_*``).

    master: the store master, ``HOST:PORT`` or ``etcd://HOST:PORT[/PREFIX/]``.
    tenant: the store tenant of this instance's blocks (its token from
        $KVCAKE_STORE_TENANT_TOKEN).
    segment_size: memory this instance adds to the store, bytes (0: a pure client; the pool
        is a kvcake node's, so it outlives the instance).
    staging_bytes: the pre-touched buffer blocks pass through on their way to and from the
        store; a save that finds it full is dropped (and counted), never waited for (0: room
        for every block one step can fill, and at least 128 MiB).
    control: ``HOST:PORT`` where the scheduler side serves prefill/decode control calls
        (:mod:`kvcake.wire.vllm`; port 0: any); ``""``: no disaggregation. With it the KV
        cache lives in a registered segment, so prefill instances write into it.
    control_file: where the control endpoint is written once it serves (for the sidecar).
    instance_id: the instance's name at the Conductor; the KV cache's segment is bound to it.
    layered_load: copy loaded blocks into the KV cache layer by layer on a helper thread while
        the forward pass runs, each attention layer waiting only for its own layer (off:
        every block whole before the forward pass). On 2 vCPUs it gained on 180 MiB loads
        and lost a little on 84 MiB ones, so it is off unless asked for.
    """

    master: str = "127.0.0.1:50051"
    tenant: str = DEFAULT_TENANT
    segment_size: int = 0
    staging_bytes: int = 0
    control: str = ""
    control_file: str = ""
    instance_id: str = ""
    layered_load: bool = False

    def __post_init__(self) -> None:
        require(":" in self.master, f"master must be HOST:PORT or etcd://HOST:PORT, got "
                f"{self.master!r}")
        check_tenant_name(self.tenant)
        require(not self.control or ":" in self.control,
                f"control must be HOST:PORT, got {self.control!r}")
        check_at_least(self, 0, "segment_size")
        check_at_least(self, 0, "staging_bytes")


def connector_config(extra: Mapping[str, Any]) -> VllmConnectorConfig:
    """Defaults, ``KVCAKE_VLLM_*``, then vLLM's ``kv_connector_extra_config`` (sizes as
    numbers or text such as ``"256MiB"``); an unknown key is refused by name."""
    given = table_values(VllmConnectorConfig, "kv_connector_extra_config", dict(extra))
    return load_config(VllmConnectorConfig, "vllm", given)


@dataclass(frozen=True)
class VllmServerConfig:
    """The vLLM server a sidecar (``kvcake vllm-instance``) starts and speaks for
    (``KVCAKE_VLLM_SERVER_*``).

    python: the vLLM venv's interpreter (empty: ``$KVCAKE_VLLM_PYTHON``, else
        ``.venv-vllm/bin/python``).
    model: ``smollm2`` or an HF directory; vLLM serves it as ``served_model_name``.
    served_model_name: the name vLLM answers to.
    store_master: the KV store under the instance (``HOST:PORT``, ``etcd://...``).
    port: vLLM's HTTP port on 127.0.0.1 (0: a free one).
    block_size: tokens per KV block (vLLM-CPU's is 128); the Conductor indexes the same.
    max_model_len: the longest context.
    max_num_seqs: requests in one batch.
    max_num_batched_tokens: tokens per step (chunked prefill).
    kv_cache_gib: vLLM-CPU's KV cache, GiB (``VLLM_CPU_KVCACHE_SPACE``).
    dtype: vLLM's model dtype (``auto``: bfloat16 where the CPU computes it natively, else
        float32, as kvcake's engine picks, resolved when the config is made; vLLM's own
        ``auto`` takes the model's bfloat16 and emulates it several times slower on a CPU
        without it).
    enforce_eager: skip torch.compile (vLLM starts in about half the time; steps may be
        slower).
    cpus: the CPUs vLLM binds its OpenMP threads to, e.g. ``1`` or ``0-3`` (empty: every
        CPU this process may use).
    start_timeout_s: how long vLLM may take to serve.
    """

    python: str = ""
    model: str = "smollm2"
    served_model_name: str = "smollm2"
    store_master: str = "127.0.0.1:50051"
    port: int = 0
    block_size: int = 128
    max_model_len: int = 8192
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    kv_cache_gib: int = 1
    dtype: str = "auto"
    enforce_eager: bool = False
    cpus: str = ""
    start_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        require(":" in self.store_master, f"store_master must be HOST:PORT or etcd://..., "
                f"got {self.store_master!r}")
        check_at_least(self, 1, "block_size", "max_model_len", "max_num_seqs",
                       "max_num_batched_tokens", "kv_cache_gib", "start_timeout_s")
        check_at_least(self, 0, "port")
        parse_cpus(self.cpus)
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, "cpu"))


@dataclass(frozen=True)
class VllmInstanceConfig:
    """A vLLM server under the Conductor: its sidecar's settings (``KVCAKE_INSTANCE_*``).

    role: ``prefill``, ``decode`` or ``both`` (colocated), as ``kvcake worker``'s.
    conductor: ``HOST:PORT`` of the Conductor's instance RPC endpoint.
    host / port: where the sidecar's RPC server and the connector's control server bind
        (port 0: ephemeral).
    instance_id: its name at the Conductor (empty: ``<role>-<pid>``).
    report_s: seconds between load reports.
    reserve_timeout_s: a decode reservation whose prefill never commits is freed after this
        (and ``transfer_timeout_s`` more: its grants let the prefill write until then).
    transfer_timeout_s: longest wait for a prefill's KV writes to land.
    profile_lock: as ``kvcake worker``'s: a file instances started together lock while
        they time their start-up requests (empty: none).
    """

    role: str = "both"
    conductor: str = "127.0.0.1:8100"
    host: str = "127.0.0.1"
    port: int = 0
    instance_id: str = ""
    report_s: float = 0.1
    reserve_timeout_s: float = 30.0
    transfer_timeout_s: float = 30.0
    profile_lock: str = ""

    def __post_init__(self) -> None:
        check_bind_host(self.host)
        require(self.role in ROLES, f"role must be one of {ROLES}, got {self.role!r}")
        require(":" in self.conductor, f"conductor must be HOST:PORT, got {self.conductor!r}")
        check_at_least(self, 0, "port")
        check_at_least(self, 0.001, "report_s", "reserve_timeout_s", "transfer_timeout_s")
