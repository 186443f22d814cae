"""A KV region's byte ranges: one layer's ranges are that layer's share of all of them, in
each of the layouts a region describes."""

from __future__ import annotations

import pytest

from kvcake.transfer.segment import SegmentDescriptor
from kvcake.wire.kv import KVRegion

DESCRIPTOR = SegmentDescriptor("kv", 1, 1 << 20, "host", "127.0.0.1:1", "", 0)
LAYOUTS = {
    "kvcake planes": KVRegion(DESCRIPTOR, "fp", 3, 64, 32, 16),
    "vllm, a layer's blocks together": KVRegion(DESCRIPTOR, "fp", 3, 64, 32, 16,
                                                block_stride=512, layer_stride=4 * 512 * 4),
    "blocks apart": KVRegion(DESCRIPTOR, "fp", 3, 64, 32, 16, block_stride=1024,
                             layer_stride=4 * 1024),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_the_layers_ranges_together_are_the_whole_run(name: str) -> None:
    region = LAYOUTS[name]
    whole = region.block_ranges(1, 2)
    by_layer = [region.block_ranges(1, 2, range(layer, layer + 1)) for layer in range(3)]
    assert sorted(r for ranges in by_layer for r in ranges) == sorted(whole)
    assert all(by_layer) and len({r for ranges in by_layer for r in ranges}) == len(whole)
    assert region.block_ranges(1, 2, range(3)) == whole
    assert region.block_ranges(1, 2, range(0)) == []
