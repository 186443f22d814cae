"""The store master's settings (``KVCAKE_MASTER_*``) and each tenant's terms at it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvcake.common.config import check_at_least, check_within, require
from kvcake.common.hosts import check_bind_host
from kvcake.store.config import check_tenant_name


@dataclass(frozen=True)
class TenantPolicy:
    """One tenant's terms at the store master.

    name: the tenant (see :func:`check_tenant_name`).
    quota_bytes: most memory-tier bytes its objects may hold, every replica counted
        (0 = unlimited; ``None`` = the master's ``default_tenant_quota_bytes``).
    token: when set, a client registers as this tenant only by presenting it.
    """

    name: str
    quota_bytes: int | None = None
    token: str = dataclasses.field(default="", repr=False)

    def __post_init__(self) -> None:
        check_tenant_name(self.name)
        require(self.quota_bytes is None or self.quota_bytes >= 0,
                f"quota of tenant {self.name!r} must be >= 0, got {self.quota_bytes}")


@dataclass(frozen=True)
class MasterConfig:
    """Store master settings (``KVCAKE_MASTER_*``).

    host, port: the RPC listener (port 0: ephemeral; 50051 is Mooncake's master's too).
    metrics_port: HTTP port of ``/metrics`` (0 = ephemeral, -1 = off).
    lease_ttl_s: how long a get/exist protects an object from removal and eviction (> 0).
    client_ttl_s: a client or node silent this long is dead; its segments are unmounted.
    put_timeout_s: a put not ended after this long is revoked (its writer is presumed gone).
    high_watermark: fraction of pool bytes used above which eviction starts (0.1..1).
    evict_ratio: fraction of pool bytes each eviction round frees (0 < r < high_watermark).
    eviction: eviction policy by name: ``lru``, ``fifo``.
    placement: placement policy by name: ``random``, ``free_ratio_first``, ``local_first``.
    soft_pin_ttl_s: default soft-pin duration when a put asks for one without a ttl.
    max_key_bytes: longest key accepted, UTF-8 bytes.
    tick_s: period of the background sweep (expiry, eviction), seconds.
    summary_s: period of the one-line log summary (0 = off).
    seed: seeds random placement and segment ids (0 = from the OS).
    default_tenant_quota_bytes: quota of every tenant ``tenants`` does not name (0 = unlimited).
    tenants: per-tenant quotas and tokens (``--tenant-quota``, ``--tenants-file``).
    etcd: ``etcd://HOST:PORT[/PREFIX/]`` for high availability (empty = a lone master):
        masters of one prefix elect a leader, which persists its state there.
    leader_ttl_s: the leader's etcd lease, whole seconds (2..60): a dead leader is replaced
        after about this long.
    put_fence_s: how long a new leader holds puts after taking over (>= 0), so that writes
        still in flight to memory the old leader handed out land first.
    poll_us: how long the master keeps polling its connections for the next request
        before it sleeps, microseconds (0: never); only while requests come that fast
        (:class:`kvcake.common.stream.ReadPoller`).
    location_slots: objects a lone master publishes for the clients of its host to find
        without asking (:mod:`kvcake.store.locations`; a power of two, 64 bytes each; 0 =
        publish none).
    arena_bytes: space a same-host client of a publishing master is granted at a time to
        put into without asking (:mod:`kvcake.store.commits`; at most a sixteenth of the
        segment it lies in; 0 = none, every put asks).
    """

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9003
    lease_ttl_s: float = 5.0
    client_ttl_s: float = 10.0
    put_timeout_s: float = 30.0
    high_watermark: float = 0.9
    evict_ratio: float = 0.05
    eviction: str = "lru"
    placement: str = "random"
    soft_pin_ttl_s: float = 1800.0
    max_key_bytes: int = 4096
    tick_s: float = 0.5
    summary_s: float = 30.0
    seed: int = 0
    default_tenant_quota_bytes: int = 0
    tenants: tuple[TenantPolicy, ...] = ()
    etcd: str = ""
    leader_ttl_s: int = 3
    put_fence_s: float = 1.0
    poll_us: float = 200.0
    location_slots: int = 1 << 17
    arena_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        check_bind_host(self.host)
        check_within(self, 0, 65535, "port")
        check_within(self, -1, 65535, "metrics_port")
        check_within(self, 2, 60, "leader_ttl_s")
        check_within(self, 1, 65536, "max_key_bytes")
        check_at_least(self, 0, "put_fence_s", "summary_s", "poll_us", "arena_bytes")
        require(self.location_slots >= 0 and not self.location_slots & (self.location_slots - 1),
                f"location_slots must be 0 or a power of two, got {self.location_slots}")
        check_at_least(self, 0, "lease_ttl_s", "client_ttl_s", "put_timeout_s", "soft_pin_ttl_s",
                       "tick_s", above=True)
        require(not self.etcd or ":" in self.etcd,
                f"etcd must be etcd://HOST:PORT[/PREFIX/], got {self.etcd!r}")
        _check_tenants(self.default_tenant_quota_bytes, self.tenants)
        require(0.1 <= self.high_watermark <= 1.0,
                f"high_watermark must be 0.1..1, got {self.high_watermark}")
        require(0 < self.evict_ratio < self.high_watermark,
                f"evict_ratio must be in (0, high_watermark), got {self.evict_ratio}")


def _check_tenants(default_quota: int, tenants: tuple[TenantPolicy, ...]) -> None:
    require(default_quota >= 0, f"default_tenant_quota_bytes must be >= 0, got {default_quota}")
    require(isinstance(tenants, tuple) and all(isinstance(t, TenantPolicy) for t in tenants),
            "tenants must be TenantPolicy entries (give them with --tenant-quota or "
            "--tenants-file)")
    names = [t.name for t in tenants]
    twice = sorted({n for n in names if names.count(n) > 1})
    require(not twice, f"tenant named more than once: {', '.join(twice)}")
