"""The distributed KV cache store: a master (metadata, allocation, leases, eviction,
replicas), storage nodes that contribute memory (and disk), and clients with Mooncake's API."""

from kvcake.store.client import AsyncStore
from kvcake.store.compat import DistributedStore
from kvcake.store.master import (
    EVICTION_POLICIES,
    PLACEMENT_POLICIES,
    EvictionPolicy,
    MasterServer,
    MasterService,
    PlacementPolicy,
    Replica,
    ReplicaState,
    StoredObject,
    make_eviction_policy,
)
from kvcake.store.messages import ReplicateConfig

MooncakeDistributedStore = DistributedStore

__all__ = [
    "EVICTION_POLICIES",
    "PLACEMENT_POLICIES",
    "AsyncStore",
    "DistributedStore",
    "EvictionPolicy",
    "MasterServer",
    "MasterService",
    "MooncakeDistributedStore",
    "PlacementPolicy",
    "Replica",
    "ReplicaState",
    "ReplicateConfig",
    "StoredObject",
    "make_eviction_policy",
]
