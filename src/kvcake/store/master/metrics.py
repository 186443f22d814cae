"""The master's Prometheus text and its one-line log summary."""

from __future__ import annotations

from collections.abc import Mapping

from kvcake.common.config import format_size
from kvcake.wire.store import Stats


def render_metrics(stats: Stats, counters: Mapping[str, int],
                   requests: Mapping[str, int]) -> str:
    lines: list[str] = []
    gauges = (
        ("kvcake_store_used_bytes", "Bytes allocated to replicas in memory", stats.used_bytes),
        ("kvcake_store_total_bytes", "Bytes of all mounted segments", stats.total_bytes),
        ("kvcake_store_arena_bytes", "Bytes granted to clients' arenas, not put into yet",
         stats.arena_bytes),
        ("kvcake_store_retired_bytes", "Bytes of removed objects held until their readers' "
         "leases end", stats.retired_bytes),
        ("kvcake_store_disk_used_bytes", "Bytes offloaded to node disks", stats.disk_used_bytes),
        ("kvcake_store_disk_total_bytes", "Disk tier capacity", stats.disk_total_bytes),
        ("kvcake_store_keys", "Complete objects", stats.num_keys),
        ("kvcake_store_replicas", "Readable replicas", stats.num_replicas),
        ("kvcake_store_segments", "Mounted segments", stats.num_segments),
        ("kvcake_store_clients", "Live clients and nodes", stats.num_clients),
    )
    for name, help_text, value in gauges:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
    for name, value in sorted(counters.items()):
        metric = f"kvcake_store_{name}_total"
        lines += [f"# TYPE {metric} counter", f"{metric} {value}"]
    lines += _tenant_lines(stats)
    lines.append("# HELP kvcake_store_requests_total Master requests by operation")
    lines.append("# TYPE kvcake_store_requests_total counter")
    lines += [f'kvcake_store_requests_total{{op="{op}"}} {n}' for op, n in sorted(requests.items())]
    return "\n".join(lines) + "\n"


def _tenant_lines(stats: Stats) -> list[str]:
    """Per-tenant gauges and eviction counts (tenant names need no escaping: see
    :func:`kvcake.store.config.check_tenant_name`)."""
    lines: list[str] = []
    series = (
        ("kvcake_store_tenant_used_bytes", "gauge", "Memory bytes of a tenant's replicas",
         "used_bytes"),
        ("kvcake_store_tenant_quota_bytes", "gauge", "A tenant's quota (0 = unlimited)",
         "quota_bytes"),
        ("kvcake_store_tenant_keys", "gauge", "A tenant's complete objects", "num_keys"),
        ("kvcake_store_tenant_evicted_total", "counter", "A tenant's objects evicted",
         "evicted"),
    )
    for name, kind, help_text, field in series:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{tenant="{t.tenant}"}} {int(getattr(t, field))}'
                  for t in stats.tenants]
    return lines


def summary_line(stats: Stats, counters: Mapping[str, int]) -> str:
    ratio = stats.used_bytes / stats.total_bytes if stats.total_bytes else 0.0
    return (f"keys={stats.num_keys} replicas={stats.num_replicas} "
            f"used={format_size(stats.used_bytes)}/{format_size(stats.total_bytes)} "
            f"({ratio:.0%}) segments={stats.num_segments} clients={stats.num_clients} "
            f"hits={counters['hits']} misses={counters['misses']} "
            f"evicted={counters['evicted']} offloaded={counters['offloaded']} "
            f"promoted={counters['promoted']} disk_evicted={counters['disk_evicted']}")
