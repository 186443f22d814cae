"""What Mooncake's API hands back besides ints and bytes: replica descriptors
(``get_replica_desc``) and buffer handles (``get_buffer``), with Mooncake's names.

kvcake's disk tier is a storage node's own disk, Mooncake's LOCAL_DISK kind of replica:
``is_local_disk_replica()`` is true for it, ``is_disk_replica()`` (Mooncake's shared-file
DISK kind) never is. A memory replica's ``buffer_address`` is its offset in its segment
(kvcake segments are addressed by offset), ``transport_endpoint`` the segment's name.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from enum import IntEnum

from kvcake.common.errors import InvalidParamsError
from kvcake.wire.store import ReplicaInfo


class ReplicaStatus(IntEnum):
    """Mooncake's ``ReplicaStatus``."""

    UNDEFINED = 0
    INITIALIZED = 1
    PROCESSING = 2
    COMPLETE = 3
    REMOVED = 4
    FAILED = 5


@dataclass
class Descriptor:
    """A memory replica's bytes (Mooncake's ``AllocatedBuffer.Descriptor``)."""

    size: int = 0
    buffer_address: int = 0
    transport_endpoint: str = ""

    def __repr__(self) -> str:
        return (f"<Descriptor size={self.size} buffer_address={self.buffer_address} "
                f"transport_endpoint={self.transport_endpoint}>")


@dataclass
class MemoryDescriptor:
    buffer_descriptor: Descriptor


@dataclass
class DiskDescriptor:
    file_path: str = ""
    object_size: int = 0


@dataclass
class LocalDiskDescriptor:
    """A replica on a storage node's own disk: its size, and the node's endpoint."""

    object_size: int = 0
    transport_endpoint: str = ""


class ReplicaDescriptor:
    """One replica of an object, as ``get_replica_desc`` describes it."""

    def __init__(self, info: ReplicaInfo) -> None:
        self._info = info
        self.status = ReplicaStatus[info.state.upper()]

    def is_memory_replica(self) -> bool:
        return self._info.tier == "memory"

    def is_disk_replica(self) -> bool:
        return False  # kvcake has no shared-file DISK replicas

    def is_local_disk_replica(self) -> bool:
        return self._info.tier == "disk"

    def get_memory_descriptor(self) -> MemoryDescriptor:
        if not self.is_memory_replica():
            raise InvalidParamsError("not a memory replica")
        info = self._info
        return MemoryDescriptor(Descriptor(info.size, info.offset, info.segment))

    def get_disk_descriptor(self) -> DiskDescriptor:
        raise InvalidParamsError("not a DISK replica (kvcake's disk tier is LOCAL_DISK: "
                                 "see get_local_disk_descriptor)")

    def get_local_disk_descriptor(self) -> LocalDiskDescriptor:
        if not self.is_local_disk_replica():
            raise InvalidParamsError("not a LOCAL_DISK replica")
        return LocalDiskDescriptor(self._info.size, self._info.endpoint)

    def __repr__(self) -> str:
        return (f"ReplicaDescriptor({self._info.tier}, {self.status.name}, "
                f"segment={self._info.segment!r}, size={self._info.size})")


class BufferHandle(bytearray):
    """A value read by ``get_buffer``: its bytes (the buffer protocol), ``size()`` and
    ``ptr()`` (the address of its first byte)."""

    def size(self) -> int:
        return len(self)

    def ptr(self) -> int:
        if not self:
            return 0
        return ctypes.addressof((ctypes.c_char * len(self)).from_buffer(self))
