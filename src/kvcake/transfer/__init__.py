"""The transfer engine: registered memory segments moved between processes and hosts."""

from kvcake.transfer.batch import (
    Batch,
    BatchState,
    MappedRange,
    RemoteSegment,
    TransferOp,
    TransferRequest,
)
from kvcake.transfer.engine import TransferEngine
from kvcake.transfer.grants import GrantMode
from kvcake.transfer.metadata import (
    EtcdDirectory,
    LocalDirectory,
    MetadataDirectory,
    P2PDirectory,
)
from kvcake.transfer.segment import Segment, SegmentDescriptor
from kvcake.transfer.transports import TRANSPORTS, Transport

__all__ = [
    "TRANSPORTS",
    "Batch",
    "BatchState",
    "EtcdDirectory",
    "GrantMode",
    "LocalDirectory",
    "MappedRange",
    "MetadataDirectory",
    "P2PDirectory",
    "RemoteSegment",
    "Segment",
    "SegmentDescriptor",
    "TransferEngine",
    "TransferOp",
    "TransferRequest",
    "Transport",
]
