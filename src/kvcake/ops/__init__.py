"""Operations helpers that ``kvcake up``, the benchmarks, the fault-injection suite and the
tests share: child server processes (start, readiness, stop by pid), a local etcd, and a pair
of network namespaces that stand in for two hosts."""

from __future__ import annotations

from kvcake.ops.etcd import etcd_command, start_etcd
from kvcake.ops.netns import NetnsPair, Side, check_netns_support
from kvcake.ops.process import (
    ReadyFile,
    ServerProcess,
    health,
    kvcake_command,
    start_master,
    start_node,
    wait_ready,
)

__all__ = [
    "NetnsPair",
    "ReadyFile",
    "ServerProcess",
    "Side",
    "check_netns_support",
    "etcd_command",
    "health",
    "kvcake_command",
    "start_etcd",
    "start_master",
    "start_node",
    "wait_ready",
]
