"""The distributed KV cache store: a master (metadata, allocation, leases, eviction,
replicas), storage nodes that contribute memory (and disk), and clients with Mooncake's API."""

from kvcake.store.client import AsyncStore
from kvcake.store.compat import BufferPool, DistributedStore, ReplicaDescriptor
from kvcake.store.master.eviction import EVICTION_POLICIES, EvictionPolicy, make_eviction_policy
from kvcake.store.master.placement import PLACEMENT_POLICIES, PlacementPolicy
from kvcake.store.master.replica import Replica, ReplicaState, StoredObject
from kvcake.store.master.server import MasterServer
from kvcake.store.master.service import MasterService
from kvcake.store.replicate import ReplicateConfig, SoftPinAction

MooncakeDistributedStore = DistributedStore

__all__ = [
    "EVICTION_POLICIES",
    "PLACEMENT_POLICIES",
    "AsyncStore",
    "BufferPool",
    "DistributedStore",
    "EvictionPolicy",
    "MasterServer",
    "MasterService",
    "MooncakeDistributedStore",
    "PlacementPolicy",
    "Replica",
    "ReplicaDescriptor",
    "ReplicaState",
    "ReplicateConfig",
    "SoftPinAction",
    "StoredObject",
    "make_eviction_policy",
]
