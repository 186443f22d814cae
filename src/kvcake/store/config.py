"""A store client's or node's settings (``KVCAKE_STORE_*``) and the tenant names every part
of the store shares; the master's own settings are in :mod:`kvcake.store.master.config`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from kvcake.common.config import check_at_least, check_within, require

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
    heartbeat_s: longest heartbeat period (shorter where the master's ``client_ttl_s``
        asks: see :data:`kvcake.store.session.BEATS_PER_TTL`).
    rpc_timeout_s: longest wait for one master call before ``RPC_FAIL``.
    reply_spin_us: how long a synchronous call polls for the master's reply before it
        sleeps, microseconds (0: never poll); only while replies come that fast.
    disk_dir, disk_capacity: the optional SSD tier of a node (both or neither).
    tenant: the namespace and quota this client's keys belong to (see
        :func:`check_tenant_name`; its token from $KVCAKE_STORE_TENANT_TOKEN).
    tenant_token: the tenant's token, when the master asks for one.
    control_port: a node's control RPC port (its disk tier, and where processes of its host
        attach with Mooncake's ``setup_dummy``); 0 = ephemeral.
    """

    master: str = "127.0.0.1:50051"
    segment_size: int = 0
    segment_name: str = ""
    heartbeat_s: float = 1.0
    rpc_timeout_s: float = 10.0
    reply_spin_us: float = 200.0
    disk_dir: str = ""
    disk_capacity: int = 0
    tenant: str = DEFAULT_TENANT
    tenant_token: str = dataclasses.field(default="", repr=False)
    control_port: int = 0

    def __post_init__(self) -> None:
        require(":" in self.master, f"master must be HOST:PORT, got {self.master!r}")
        check_at_least(self, 0, "segment_size", "reply_spin_us")
        check_within(self, 0, 65535, "control_port")
        check_at_least(self, 0, "heartbeat_s", "rpc_timeout_s", above=True)
        require(bool(self.disk_dir) == (self.disk_capacity > 0),
                "disk_dir and disk_capacity go together (both set, or neither)")
        check_tenant_name(self.tenant)
