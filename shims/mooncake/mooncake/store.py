"""Mooncake's ``mooncake.store`` names, served by kvcake (see the ``mooncake`` package's
docstring); :mod:`kvcake.store.compat` documents the semantics."""

from kvcake.store.compat import (
    BufferHandle,
    BufferLease,
    BufferPool,
    Descriptor,
    DiskDescriptor,
    DistributedStore,
    LocalDiskDescriptor,
    MemoryDescriptor,
    MooncakeDistributedStore,
    RegisteredBufferLease,
    RegisteredBufferPool,
    ReplicaDescriptor,
    ReplicaStatus,
    ReplicateConfig,
    SoftPinAction,
)

__all__ = [
    "BufferHandle",
    "BufferLease",
    "BufferPool",
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
]
