"""The transfer engine's settings (``KVCAKE_TRANSFER_*``), frozen and checked when built."""

from __future__ import annotations

from dataclasses import dataclass

from kvcake.common.config import GiB, KiB, check_at_least, check_within, require
from kvcake.common.hosts import check_bind_host

TRANSPORT_CHOICES = ("auto", "shm", "tcp")


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
    reply_spin_us: how long a transfer run in the caller's thread polls for each peer reply
        before it sleeps, microseconds (0: never poll); only while replies come that fast.
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
    reply_spin_us: float = 200.0

    def __post_init__(self) -> None:
        check_bind_host(self.host)
        check_within(self, 0, 65535, "port")
        check_within(self, 1, 64, "connections_per_peer")
        check_at_least(self, 0, "timeout_s", above=True)
        check_at_least(self, 0, "reply_spin_us")
        require(self.transport in TRANSPORT_CHOICES,
                f"transport must be one of {TRANSPORT_CHOICES}, got {self.transport!r}")
        require(self.metadata in ("p2p", "local") or self.metadata.startswith("etcd://"),
                f"metadata must be p2p, local or etcd://HOST:PORT, got {self.metadata!r}")
        require(64 * KiB <= self.max_frame_bytes <= 4 * GiB,
                f"max_frame_bytes must be 64KiB..4GiB, got {self.max_frame_bytes}")
