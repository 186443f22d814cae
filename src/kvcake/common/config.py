"""Typed, frozen configuration, and the one place that reads ``KVCAKE_*`` variables.

Each component has a ``@dataclass(frozen=True)`` config whose fields document units and
ranges and are validated in ``__post_init__``. :func:`load_config` layers, lowest first:
field defaults, ``KVCAKE_<SECTION>_<FIELD>`` environment variables, explicit overrides (CLI
flags).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from kvcake.common.errors import InvalidParamsError
from kvcake.common.hosts import check_bind_host

C = TypeVar("C")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

TRANSPORT_CHOICES = ("auto", "shm", "tcp")
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size(text: str) -> int:
    """``"64KiB"``, ``"16M"``, ``"1g"`` or ``"4096"`` to a byte count (binary units)."""
    match = _SIZE.match(text)
    if match is None:
        raise InvalidParamsError(f"not a size: {text!r} (try 4096, 64KiB, 16MiB, 1GiB)")
    return int(match.group(1)) * _UNITS[match.group(2)[:1].lower()]


def format_size(size: int) -> str:
    """Bytes in the largest binary unit that keeps one decimal meaningful: ``1.5 GiB``."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} B"


def require(ok: bool, message: str) -> None:
    """Raise :class:`InvalidParamsError` with ``message`` unless ``ok`` (configs' checks)."""
    if not ok:
        raise InvalidParamsError(message)


@dataclass(frozen=True)
class TransferConfig:
    """Transfer engine settings.

    host: address the TCP server binds and advertises (127.0.0.1, or a namespace address).
    port: TCP port, 0 for an ephemeral one.
    transport: ``auto`` (shm for peers on this host, tcp otherwise), or force ``shm``/``tcp``.
    metadata: segment directory: ``p2p`` (ask the peer's server), ``local`` (this process),
        or ``etcd://HOST:PORT`` for a cluster's etcd.
    connections_per_peer: TCP connections opened to each peer, 1..64; big batches spread
        over them.
    timeout_s: longest wait for any one batch before its operations fail, seconds (> 0).
    max_frame_bytes: largest single frame payload accepted, bytes (64 KiB .. 4 GiB).
    host_id: identity of this host for transport choice; empty derives it from the boot id
        and the network namespace.
    pretouch: fault in segment pages at registration so first transfers run at full speed.
    """

    host: str = "127.0.0.1"
    port: int = 0
    transport: str = "auto"
    metadata: str = "p2p"
    connections_per_peer: int = 2
    timeout_s: float = 30.0
    max_frame_bytes: int = GiB
    host_id: str = ""
    pretouch: bool = True

    def __post_init__(self) -> None:
        check_bind_host(self.host)
        require(0 <= self.port <= 65535, f"port must be 0..65535, got {self.port}")
        require(
            self.transport in TRANSPORT_CHOICES,
            f"transport must be one of {TRANSPORT_CHOICES}, got {self.transport!r}",
        )
        require(
            self.metadata in ("p2p", "local") or self.metadata.startswith("etcd://"),
            f"metadata must be p2p, local or etcd://HOST:PORT, got {self.metadata!r}",
        )
        require(
            1 <= self.connections_per_peer <= 64,
            f"connections_per_peer must be 1..64, got {self.connections_per_peer}",
        )
        require(self.timeout_s > 0, f"timeout_s must be > 0, got {self.timeout_s}")
        require(
            64 * KiB <= self.max_frame_bytes <= 4 * GiB,
            f"max_frame_bytes must be 64KiB..4GiB, got {self.max_frame_bytes}",
        )


def _convert(raw: str, kind: Any, name: str) -> Any:
    if kind in (bool, "bool"):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise InvalidParamsError(f"{name}: expected true/false, got {raw!r}")
    if kind in (int, "int"):
        sized = name.endswith(("BYTES", "SIZE", "CAPACITY"))
        return parse_size(raw) if sized else _as_number(int, raw, name)
    if kind in (float, "float"):
        return _as_number(float, raw, name)
    return raw


def _as_number(kind: type[Any], raw: str, name: str) -> Any:
    try:
        return kind(raw)
    except ValueError:
        raise InvalidParamsError(f"{name}: expected a {kind.__name__}, got {raw!r}") from None


def load_config(
    cls: type[C],
    section: str,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> C:
    """Build ``cls`` from defaults, then ``KVCAKE_<SECTION>_<FIELD>``, then ``overrides``.

    ``None`` values in ``overrides`` mean "not given" and are skipped.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f"KVCAKE_{section.upper()}_{field.name.upper()}"
        if name in env:
            values[field.name] = _convert(env[name], field.type, name)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return cls(**values)


def env_value(name: str, default: str = "") -> str:
    """A single ``KVCAKE_<name>`` variable (for settings that belong to no config class)."""
    return os.environ.get(f"KVCAKE_{name}", default)


CLUSTER_TOKEN_ENV = "KVCAKE_CLUSTER_TOKEN"
MIN_CLUSTER_TOKEN_CHARS = 16


def read_cluster_token(token_file: str | None = None,
                       environ: Mapping[str, str] | None = None) -> str:
    """The shared cluster token: the file's content (``--cluster-token-file``) when given,
    else ``KVCAKE_CLUSTER_TOKEN``, else ``""`` (no authentication). Surrounding whitespace
    is dropped; a token shorter than 16 characters is refused. The error never quotes it."""
    env = os.environ if environ is None else environ
    token = _token_from_file(token_file) if token_file else env.get(CLUSTER_TOKEN_ENV, "")
    token = token.strip()
    source = token_file or CLUSTER_TOKEN_ENV
    require(not (token_file and not token), f"cluster token file {token_file} is empty")
    require(not token or len(token) >= MIN_CLUSTER_TOKEN_CHARS,
            f"the cluster token from {source} has {len(token)} characters; use at least "
            f"{MIN_CLUSTER_TOKEN_CHARS} (e.g. python -c 'import secrets; "
            f"print(secrets.token_hex(32))')")
    return token


def _token_from_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParamsError(f"cannot read cluster token file {path}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None


DEFAULT_TENANT = "default"
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_tenant_name(name: str) -> str:
    """A tenant name: 1..64 of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit (so it
    never holds the ``/`` the master puts between a tenant and its keys)."""
    require(isinstance(name, str) and bool(_TENANT_NAME.fullmatch(name)),
            f"tenant must be 1..64 of A-Z a-z 0-9 . _ - (starting with a letter or digit), "
            f"got {name!r}")
    return name


@dataclass(frozen=True)
class StoreConfig:
    """A store client's or storage node's settings (``KVCAKE_STORE_*``).

    master: ``HOST:PORT`` of the master.
    segment_size: bytes this process contributes to the pool (0 = none, a pure client).
    segment_name: name of that segment (empty: ``<host>:<port>`` of the transfer server).
    heartbeat_s: heartbeat period; keep well under the master's ``client_ttl_s``.
    rpc_timeout_s: longest wait for one master call before ``RPC_FAIL``.
    disk_dir, disk_capacity: the optional SSD tier of a node (both or neither).
    tenant: the namespace and quota this client's keys belong to (see
        :func:`check_tenant_name`); tenant_token: its token, when the master asks for one.
    """

    master: str = "127.0.0.1:50051"
    segment_size: int = 0
    segment_name: str = ""
    heartbeat_s: float = 1.0
    rpc_timeout_s: float = 10.0
    disk_dir: str = ""
    disk_capacity: int = 0
    tenant: str = DEFAULT_TENANT
    tenant_token: str = dataclasses.field(default="", repr=False)

    def __post_init__(self) -> None:
        require(":" in self.master, f"master must be HOST:PORT, got {self.master!r}")
        require(self.segment_size >= 0, f"segment_size must be >= 0, got {self.segment_size}")
        require(self.heartbeat_s > 0, f"heartbeat_s must be > 0, got {self.heartbeat_s}")
        require(self.rpc_timeout_s > 0, f"rpc_timeout_s must be > 0, got {self.rpc_timeout_s}")
        require(bool(self.disk_dir) == (self.disk_capacity > 0),
                "disk_dir and disk_capacity go together (both set, or neither)")
        check_tenant_name(self.tenant)


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
ATTENTION_CHOICES = ("sdpa", "eager")


@dataclass(frozen=True)
class EngineConfig:
    """Inference engine settings (``KVCAKE_ENGINE_*``).

    model: ``smollm2`` (the packaged SmolLM2-135M-Instruct), a ``.gguf`` file, or a directory
        with ``config.json`` and ``*.safetensors``.
    dtype: weights, activations and KV cache (``bfloat16``, ``float32``, ``float16``, or
        ``auto``: bfloat16 on a GPU or a CPU that computes it natively, else float32; resolved
        when the config is made, so peers compare the dtype actually used).
    device: torch device (``cpu``, ``cuda``, ``cuda:1``).
    attention: kernel (``sdpa``: fused, fastest; ``eager``: HF's exact math, for bit-faithful
        comparisons).
    block_size: tokens per KV block (a multiple of 8 is fastest; 1..1024).
    kv_cache_bytes: bytes of the paged KV pool (its block count follows from the model).
    max_num_seqs: most requests running at once.
    max_num_batched_tokens: token budget of one step (prefill chunks plus decodes).
    max_model_len: longest prompt plus output (0 = the model's own limit).
    cache_dir: where converted weights are kept (empty = ``~/.cache/kvcake``).
    tenant: namespace of this engine's KV blocks in the store.
    store_master: ``HOST:PORT`` of a kvcake store master (empty = no store connector).
    store_segment_size: bytes this engine contributes to the store pool (0 = a pure client).
    seed: seed for requests that do not give their own (0 = from the OS).
    threads: torch intra-op threads (0 = torch's default).
    """

    model: str = "smollm2"
    dtype: str = "auto"
    device: str = "cpu"
    attention: str = "sdpa"
    block_size: int = 16
    kv_cache_bytes: int = 512 * MiB
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 0
    cache_dir: str = ""
    tenant: str = "default"
    store_master: str = ""
    store_segment_size: int = 0
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        require(self.dtype in DTYPE_CHOICES, f"dtype must be one of {DTYPE_CHOICES}, "
                f"got {self.dtype!r}")
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        require(self.attention in ATTENTION_CHOICES, f"attention must be one of "
                f"{ATTENTION_CHOICES}, got {self.attention!r}")
        require(1 <= self.block_size <= 1024, f"block_size must be 1..1024, got "
                f"{self.block_size}")
        require(self.kv_cache_bytes > 0, f"kv_cache_bytes must be > 0, got "
                f"{self.kv_cache_bytes}")
        require(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        require(self.max_num_batched_tokens >= self.block_size,
                f"max_num_batched_tokens must be >= block_size, got "
                f"{self.max_num_batched_tokens}")
        require(self.max_model_len >= 0, f"max_model_len must be >= 0, got "
                f"{self.max_model_len}")
        check_tenant_name(self.tenant)
        require(not self.store_master or ":" in self.store_master,
                f"store_master must be HOST:PORT, got {self.store_master!r}")
        require(self.threads >= 0, f"threads must be >= 0, got {self.threads}")


WORKER_ROLES = ("prefill", "decode", "both")
DECODE_FAILURE_CHOICES = ("fail", "retry")


def parse_cpus(text: str) -> set[int]:
    """``"0-2,5"`` to ``{0, 1, 2, 5}``; empty text is the empty set (no restriction)."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        require(low.isdigit() and (not high or high.isdigit()),
                f"cpus must look like 0-3,5; got {text!r}")
        first, last = int(low), int(high or low)
        require(first <= last, f"cpus range {part!r} runs backwards")
        cpus.update(range(first, last + 1))
    return cpus


def _endpoint(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit()


@dataclass(frozen=True)
class WorkerConfig:
    """An inference instance under the Conductor (``KVCAKE_WORKER_*``).

    role: ``prefill`` (computes prompts, writes their KV into a decode instance), ``decode``
        (continues them), or ``both`` (colocated: one instance does the whole request).
    conductor: ``HOST:PORT`` of the Conductor's instance RPC endpoint.
    host / port: where this instance's RPC server binds and is reached (port 0: ephemeral).
    instance_id: its name at the Conductor (empty: ``<role>-<pid>``).
    report_s: seconds between load/KV-event reports.
    reserve_timeout_s: a decode reservation whose prefill never commits is freed after this.
    transfer_timeout_s: longest wait for a prefill's KV writes to land.
    profile: time a few prefill and decode steps at start-up, seeding the cost model.
    cpus: CPUs this instance may run on, e.g. ``1`` or ``0-3`` or ``0,2`` (empty: any). A
        decode instance on cores of its own keeps its token rate whatever prefill does.
    nice: added to this process's nice value (0..19): a prefill instance at a lower priority
        uses the CPU time decode instances leave, never theirs.
    """

    role: str = "both"
    conductor: str = "127.0.0.1:8100"
    host: str = "127.0.0.1"
    port: int = 0
    instance_id: str = ""
    report_s: float = 0.1
    reserve_timeout_s: float = 30.0
    transfer_timeout_s: float = 30.0
    profile: bool = True
    cpus: str = ""
    nice: int = 0

    def __post_init__(self) -> None:
        check_bind_host(self.host)
        parse_cpus(self.cpus)
        require(0 <= self.nice <= 19, f"nice must be 0..19, got {self.nice}")
        require(self.role in WORKER_ROLES, f"role must be one of {WORKER_ROLES}, "
                f"got {self.role!r}")
        require(_endpoint(self.conductor), f"conductor must be HOST:PORT, got "
                f"{self.conductor!r}")
        require(0 <= self.port <= 65535, f"port must be 0..65535, got {self.port}")
        require(self.report_s > 0, f"report_s must be > 0, got {self.report_s}")
        require(self.reserve_timeout_s > 0, f"reserve_timeout_s must be > 0, got "
                f"{self.reserve_timeout_s}")
        require(self.transfer_timeout_s > 0, f"transfer_timeout_s must be > 0, got "
                f"{self.transfer_timeout_s}")


@dataclass(frozen=True)
class ConductorServerConfig:
    """The Conductor process: instance RPC, the OpenAI API, liveness (``KVCAKE_CONDUCTOR_*``).

    host / port: the OpenAI-compatible HTTP API (port 0: ephemeral).
    rpc_host / rpc_port: where instances register and report (``rpc_host`` empty: ``host``;
        ``kvcake up`` keeps it on loopback whatever the API's address).
    model: the model whose tokenizer the API uses (as ``EngineConfig.model``).
    served_model_name: the name clients send (empty: the model's file name).
    api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>``.
    store_master: ``HOST:PORT`` of the KV store's master: routing then counts the prefix
        blocks the store holds (empty: instances' own caches only).
    instance_ttl_s: an instance silent this long is dead; its requests fail or retry.
    on_decode_failure: ``fail`` a request whose decode instance died, or ``retry`` it on
        another (continuing from the tokens already streamed).
    reserve_wait_s: how long a request may wait for room on a decode instance (its batch
        holds ``max_num_seqs`` requests at most) before it fails with 503.
    request_timeout_s: longest a request may live.
    max_body_bytes: the longest HTTP request body the API reads (longer: 413), bytes >= 1.
    keep_alive_s: how long the API keeps an idle HTTP connection open, seconds >= 1. Longer
        than clients' own idle pools (aiohttp 15 s, httpx 5 s), so the client is always the
        one that closes: a server closing as the client reuses the connection fails that
        request ("Can not write request body").
    """

    host: str = "127.0.0.1"
    port: int = 8000
    rpc_port: int = 8100
    rpc_host: str = ""
    model: str = "smollm2"
    served_model_name: str = ""
    api_key: str = ""
    cache_dir: str = ""
    store_master: str = ""
    instance_ttl_s: float = 3.0
    on_decode_failure: str = "fail"
    reserve_wait_s: float = 120.0
    request_timeout_s: float = 600.0
    max_body_bytes: int = 4 << 20
    keep_alive_s: int = 75

    def __post_init__(self) -> None:
        require(self.keep_alive_s >= 1, f"keep_alive_s must be >= 1, got {self.keep_alive_s}")
        require(not self.store_master or _endpoint(self.store_master),
                f"store_master must be HOST:PORT, got {self.store_master!r}")
        check_bind_host(self.host)
        check_bind_host(self.rpc_host, "rpc_host")
        for name in ("port", "rpc_port"):
            value = getattr(self, name)
            require(0 <= value <= 65535, f"{name} must be 0..65535, got {value}")
        require(self.instance_ttl_s > 0, f"instance_ttl_s must be > 0, got "
                f"{self.instance_ttl_s}")
        require(self.on_decode_failure in DECODE_FAILURE_CHOICES,
                f"on_decode_failure must be one of {DECODE_FAILURE_CHOICES}, got "
                f"{self.on_decode_failure!r}")
        require(self.reserve_wait_s >= 0, f"reserve_wait_s must be >= 0, got "
                f"{self.reserve_wait_s}")
        require(self.request_timeout_s > 0, f"request_timeout_s must be > 0, got "
                f"{self.request_timeout_s}")
        require(self.max_body_bytes >= 1, f"max_body_bytes must be >= 1, got "
                f"{self.max_body_bytes}")

    @property
    def rpc_bind_host(self) -> str:
        return self.rpc_host or self.host


def read_json_object(path: Path) -> dict[str, Any]:
    """A model file that must hold one JSON object; errors name the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InvalidParamsError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise InvalidParamsError(f"{path} does not hold a JSON object")
    return data
