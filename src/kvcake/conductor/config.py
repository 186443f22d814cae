"""The Conductor's settings: its routing policy's (:class:`ConductorConfig`, which the
simulator shares; ``KVCAKE_POLICY_*``) and its process's (:class:`ConductorServerConfig`:
ports, the API's limits, liveness; ``KVCAKE_CONDUCTOR_*``)."""

from __future__ import annotations

from dataclasses import dataclass

from kvcake.common.config import check_at_least, check_within, is_endpoint, require
from kvcake.common.hosts import check_bind_host
from kvcake.conductor.admission import ADMISSIONS
from kvcake.conductor.policy import POLICIES

DECODE_FAILURE_CHOICES = ("fail", "retry")


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
    request_timeout_s: longest a request may go without output (its first token, or the
        next); past it the request fails and is aborted where it runs.
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
        check_at_least(self, 1, "keep_alive_s", "max_body_bytes")
        check_at_least(self, 0, "reserve_wait_s")
        check_at_least(self, 0, "instance_ttl_s", "request_timeout_s", above=True)
        check_within(self, 0, 65535, "port", "rpc_port")
        require(not self.store_master or is_endpoint(self.store_master),
                f"store_master must be HOST:PORT, got {self.store_master!r}")
        check_bind_host(self.host)
        check_bind_host(self.rpc_host, "rpc_host")
        require(self.on_decode_failure in DECODE_FAILURE_CHOICES,
                f"on_decode_failure must be one of {DECODE_FAILURE_CHOICES}, got "
                f"{self.on_decode_failure!r}")

    @property
    def rpc_bind_host(self) -> str:
        return self.rpc_host or self.host


@dataclass(frozen=True)
class ConductorConfig:
    """Conductor settings.

    policy: routing policy by name (:data:`kvcake.conductor.policy.POLICIES`).
    admission: admission rule by name (:data:`kvcake.conductor.admission.ADMISSIONS`).
    block_size: tokens per indexed block; must match the engines' prefix hashing (>= 1).
    kv_bytes_per_token: KV bytes of one token, for transfer-time estimates (>= 1).
    balancing_threshold: Algorithm 1 pulls a remote prefix only when
        ``best_len / local_len`` exceeds this (>= 1; a local miss with a remote hit always
        counts as above).
    slo_ttft_s, slo_tbt_s: latency objectives that admission enforces, seconds (> 0).
    seed: seeds the ``random`` policy when no rng is injected (the same seed, the same choices).
    pull_from_instances: Algorithm 1 may pull a prefix straight from another instance's
        cache. kvcake's instances exchange prefixes through the store (every prefill instance
        writes its blocks there), so its server turns this off and pulls come from the store
        tier only; a simulated cluster may model direct pulls.
    drain_fit: learn from ended prefills how each prefill instance drains its queue, and
        price its queue and prefills so (:class:`kvcake.conductor.cost.DrainFit`); off, the
        cost model's prices stand as they are.
    """

    policy: str = "kvcache_centric"
    admission: str = "none"
    block_size: int = 16
    kv_bytes_per_token: int = 23040
    balancing_threshold: float = 2.0
    slo_ttft_s: float = 30.0
    slo_tbt_s: float = 0.1
    seed: int = 0
    pull_from_instances: bool = True
    drain_fit: bool = True

    def __post_init__(self) -> None:
        require(self.policy in POLICIES, f"policy must be one of "
                f"{', '.join(sorted(POLICIES))}; got {self.policy!r}")
        require(self.admission in ADMISSIONS, f"admission must be one of "
                f"{', '.join(sorted(ADMISSIONS))}; got {self.admission!r}")
        check_at_least(self, 1, "block_size", "kv_bytes_per_token", "balancing_threshold")
        check_at_least(self, 0, "slo_ttft_s", "slo_tbt_s", above=True)
