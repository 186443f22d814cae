"""Shared building blocks: errors, the wire codec and framing, configuration, hashing."""

from kvcake.common.config import GiB, KiB, MiB, load_config, parse_size
from kvcake.common.errors import (
    ErrorCode,
    InvalidParamsError,
    KvcakeError,
    MetadataError,
    ProtocolError,
    SegmentNotFoundError,
    TransferError,
)
from kvcake.common.hashing import ROOT_DIGEST, hash_block, prefix_block_hashes

__all__ = [
    "ROOT_DIGEST",
    "ErrorCode",
    "GiB",
    "InvalidParamsError",
    "KiB",
    "KvcakeError",
    "MetadataError",
    "MiB",
    "ProtocolError",
    "SegmentNotFoundError",
    "TransferError",
    "hash_block",
    "load_config",
    "parse_size",
    "prefix_block_hashes",
]
