"""What peers know of an instance's paged KV cache: its :class:`KVRegion` (where it lives and
its shape), and the store keys its blocks go under. Torch-free: the Conductor reads both."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from kvcake.transfer.segment import SegmentDescriptor


class KVRegion(msgspec.Struct, frozen=True):
    """Where an instance's paged KV cache lives, and its shape, as peers need to know it.

    kvcake's engine lays its cache out in planes, one per layer's K and one per layer's V,
    each ``num_slots * slot_bytes`` long (``block_stride == 0``). vLLM-CPU keeps every layer's
    K and V of a block together: layer ``l`` of block ``b`` is ``block_size * slot_bytes``
    bytes at ``l * layer_stride + b * block_stride``. ``control``: where the owner takes the
    notice that a prefill finished writing its blocks (``""``: no notice wanted).
    """

    descriptor: SegmentDescriptor
    fingerprint: str
    num_layers: int
    num_slots: int
    slot_bytes: int
    block_size: int
    block_stride: int = 0
    layer_stride: int = 0
    control: str = ""

    def offset(self, layer: int, kv: int, slot: int) -> int:
        return ((layer * 2 + kv) * self.num_slots + slot) * self.slot_bytes

    @property
    def num_blocks(self) -> int:
        return self.num_slots // self.block_size

    @property
    def layer_block_bytes(self) -> int:
        """One block of one layer: its K and V (vLLM's layout), or one of them (kvcake's)."""
        return self.block_size * self.slot_bytes

    def block_ranges(self, first: int, count: int, layers: range | None = None
                     ) -> list[tuple[int, int]]:
        """``(offset, length)`` of the bytes of blocks ``[first, first + count)`` in
        ``layers`` (all by default), in a fixed order (layer by layer; K before V) that is
        the same on every region of one layout."""
        layers = range(self.num_layers) if layers is None else layers
        if not self.block_stride:
            length = count * self.layer_block_bytes
            return [(self.offset(layer, kv, first * self.block_size), length)
                    for layer in layers for kv in (0, 1)]
        if self.block_stride == self.layer_block_bytes:  # a layer's blocks are contiguous
            return [(layer * self.layer_stride + first * self.block_stride,
                     count * self.layer_block_bytes) for layer in layers]
        return [(layer * self.layer_stride + block * self.block_stride, self.layer_block_bytes)
                for block in range(first, first + count) for layer in layers]

    def grant_shapes(self, block_ids: Sequence[int]) -> list[tuple[int, int, int, int]]:
        """One :meth:`grant_shape` per run of consecutive ``block_ids`` (see
        :func:`block_spans`): the grants that let a peer write exactly those blocks."""
        return [self.grant_shape(first, count) for first, count in block_spans(block_ids)]

    def grant_shape(self, first: int, count: int) -> tuple[int, int, int, int]:
        """``(offset, length, stride, repeat)`` of one grant covering blocks
        ``[first, first + count)`` (see :mod:`kvcake.transfer.grants`)."""
        if not self.block_stride:
            block_bytes = self.layer_block_bytes
            return (first * block_bytes, count * block_bytes, self.num_slots * self.slot_bytes,
                    2 * self.num_layers)
        if self.block_stride == self.layer_block_bytes:
            return (first * self.block_stride, count * self.block_stride, self.layer_stride,
                    self.num_layers)
        start = first * self.block_stride
        end = (first + count - 1) * self.block_stride + \
            (self.num_layers - 1) * self.layer_stride + self.layer_block_bytes
        return start, end - start, 0, 1


def block_spans(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """``(first, count)`` of each maximal run of consecutive ids, in order."""
    spans: list[tuple[int, int]] = []
    for block in block_ids:
        if spans and spans[-1][0] + spans[-1][1] == block:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((block, 1))
    return spans


def store_key(prefix: str, block_hash: bytes) -> str:
    """The store key of one block: ``<fingerprint>/<tenant>/<block hash hex>``."""
    return f"{prefix}/{block_hash.hex()}"


def store_keys(prefix: str, block_hashes: Sequence[bytes]) -> list[str]:
    """Store keys of blocks, in order (see :func:`store_key`)."""
    return [store_key(prefix, h) for h in block_hashes]
