"""What peers know of an instance's paged KV cache: its :class:`KVRegion` (where it lives and
its shape), and the store keys its blocks go under. Torch-free: the Conductor reads both."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from kvcake.transfer.segment import SegmentDescriptor


class KVRegion(msgspec.Struct, frozen=True):
    """Where an instance's paged KV cache lives, and its shape, as peers need to know it."""

    descriptor: SegmentDescriptor
    fingerprint: str
    num_layers: int
    num_slots: int
    slot_bytes: int
    block_size: int

    def offset(self, layer: int, kv: int, slot: int) -> int:
        return ((layer * 2 + kv) * self.num_slots + slot) * self.slot_bytes

    @property
    def num_blocks(self) -> int:
        return self.num_slots // self.block_size


def store_key(prefix: str, block_hash: bytes) -> str:
    """The store key of one block: ``<fingerprint>/<tenant>/<block hash hex>``."""
    return f"{prefix}/{block_hash.hex()}"


def store_keys(prefix: str, block_hashes: Sequence[bytes]) -> list[str]:
    """Store keys of blocks, in order (see :func:`store_key`)."""
    return [store_key(prefix, h) for h in block_hashes]
