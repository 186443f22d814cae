"""The Conductor process's settings (``KVCAKE_CONDUCTOR_*``): its ports, the API's limits and
liveness; its routing policy's are :class:`kvcake.conductor.types.ConductorConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from kvcake.common.config import check_at_least, check_within, is_endpoint, require
from kvcake.common.hosts import check_bind_host

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
