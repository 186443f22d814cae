"""The store master: which objects exist, where their replicas lie, and what to evict; it
never touches a byte of them.

::

    server.py   MasterServer: RPC, sweep timer, disk-tier tasks, /metrics     run.py
       |
    service.py  MasterService (no I/O): clients, tenants, checks; delegates to
       |        objects.py (ObjectTable) and tiering.py (Tiering: evict, offload, promote)
       |        segments.py allocator.py placement.py eviction.py tenants.py replica.py
    journal.py + ha.py: records in etcd, leader election, failover restore
"""

from kvcake.store.master.eviction import EVICTION_POLICIES, EvictionPolicy, make_eviction_policy
from kvcake.store.master.placement import PLACEMENT_POLICIES, PlacementPolicy
from kvcake.store.master.replica import Replica, ReplicaState, StoredObject
from kvcake.store.master.server import MasterServer
from kvcake.store.master.service import MasterService
from kvcake.store.master.tenants import load_tenants, merge_tenants, parse_tenant_quota

__all__ = [
    "EVICTION_POLICIES", "PLACEMENT_POLICIES", "EvictionPolicy", "MasterServer",
    "MasterService", "PlacementPolicy", "Replica", "ReplicaState", "StoredObject",
    "load_tenants", "make_eviction_policy", "merge_tenants", "parse_tenant_quota",
]
