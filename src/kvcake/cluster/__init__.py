"""Starting kvcake's processes: one cluster on one machine (``kvcake up``), and the flags of
``kvcake worker`` and ``kvcake conductor`` for clusters spread over several hosts."""

from kvcake.cluster.up import Cluster, ClusterSpec, load_spec, run_up

__all__ = ["Cluster", "ClusterSpec", "load_spec", "run_up"]
