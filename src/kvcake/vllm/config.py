"""The vLLM connector's settings (``KVCAKE_VLLM_*``, then ``kv_connector_extra_config``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvcake.common.config import MiB, check_at_least, load_config, require, table_values
from kvcake.store.config import DEFAULT_TENANT, check_tenant_name


@dataclass(frozen=True)
class VllmConnectorConfig:
    """kvcake's store under a vLLM instance (``KVCAKE_VLLM_*``).

    master: the store master, ``HOST:PORT`` or ``etcd://HOST:PORT[/PREFIX/]``.
    tenant: the store tenant of this instance's blocks (its token from
        $KVCAKE_STORE_TENANT_TOKEN).
    segment_size: memory this instance adds to the store, bytes (0: a pure client; the pool
        is a kvcake node's, so it outlives the instance).
    staging_bytes: the pre-touched buffer blocks pass through on their way to and from the
        store; a save that finds it full is dropped (and counted), never waited for.
    """

    master: str = "127.0.0.1:50051"
    tenant: str = DEFAULT_TENANT
    segment_size: int = 0
    staging_bytes: int = 128 * MiB

    def __post_init__(self) -> None:
        require(":" in self.master, f"master must be HOST:PORT or etcd://HOST:PORT, got "
                f"{self.master!r}")
        check_tenant_name(self.tenant)
        check_at_least(self, 0, "segment_size")
        check_at_least(self, 1, "staging_bytes")


def connector_config(extra: Mapping[str, Any]) -> VllmConnectorConfig:
    """Defaults, ``KVCAKE_VLLM_*``, then vLLM's ``kv_connector_extra_config`` (sizes as
    numbers or text such as ``"256MiB"``); an unknown key is refused by name."""
    given = table_values(VllmConnectorConfig, "kv_connector_extra_config", dict(extra))
    return load_config(VllmConnectorConfig, "vllm", given)
