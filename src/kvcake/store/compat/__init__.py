"""Mooncake's ``MooncakeDistributedStore`` Python API over kvcake's store. A Mooncake user
switches by changing the import::

    from kvcake.store.compat import DistributedStore as MooncakeDistributedStore
    from kvcake.store.compat import ReplicateConfig, SoftPinAction

or, unchanged, through the drop-in ``mooncake`` package kept in ``shims/mooncake`` (see
``docs/store.md``). Underneath runs the asyncio :class:`kvcake.store.AsyncStore` on its
transfer engine's loop thread.

========================  ======================================================
module                    what
========================  ======================================================
``store``                 ``DistributedStore``: setup, bytes values, metadata
``zero_copy``             registered buffers: ``*_from``, ``*_into``, ranges
``options``               ``setup``'s arguments, sizes, hostnames
``buffers``               the registered buffers and the local buffer budget
``buffer_pool``           ``BufferPool``: leases of registered, pre-touched memory
``ranges``                ``get_into_ranges``' plan and nested answer
``descriptors``           replica descriptors, buffer handles
========================  ======================================================
"""

from kvcake.store.client import as_view
from kvcake.store.compat.buffer_pool import BufferLease, BufferPool, BufferPoolError
from kvcake.store.compat.descriptors import (
    BufferHandle,
    Descriptor,
    DiskDescriptor,
    LocalDiskDescriptor,
    MemoryDescriptor,
    ReplicaDescriptor,
    ReplicaStatus,
)
from kvcake.store.compat.store import DistributedStore
from kvcake.store.replicate import ReplicateConfig, SoftPinAction

MooncakeDistributedStore = DistributedStore
RegisteredBufferPool = BufferPool  # Mooncake's other names for them
RegisteredBufferLease = BufferLease

__all__ = [
    "BufferHandle",
    "BufferLease",
    "BufferPool",
    "BufferPoolError",
    "Descriptor",
    "DiskDescriptor",
    "DistributedStore",
    "LocalDiskDescriptor",
    "MemoryDescriptor",
    "MooncakeDistributedStore",
    "RegisteredBufferLease",
    "RegisteredBufferPool",
    "ReplicaDescriptor",
    "ReplicaStatus",
    "ReplicateConfig",
    "SoftPinAction",
    "as_view",
]
