"""The distributed KV cache store: a master (metadata, allocation, leases, eviction,
replicas), storage nodes that contribute memory (and disk), and clients with Mooncake's API."""

from kvcake.store.client import AsyncStore
from kvcake.store.compat import DistributedStore
from kvcake.store.eviction import EVICTION_POLICIES, EvictionPolicy, make_eviction_policy
from kvcake.store.messages import ReplicateConfig
from kvcake.store.placement import PLACEMENT_POLICIES, PlacementPolicy
from kvcake.store.replica import Replica, ReplicaState, StoredObject
from kvcake.store.server import MasterServer
from kvcake.store.service import MasterService

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
