"""Control messages of the transfer channel (encoded by :mod:`kvcake.common.codec`)."""

from __future__ import annotations

import msgspec

from kvcake.transfer.segment import SegmentDescriptor


class DescribeRequest(msgspec.Struct, frozen=True, tag="describe"):
    """Ask a peer for the descriptors of its segments (all of them when ``names`` is empty)."""

    names: list[str] = []


class DescribeReply(msgspec.Struct, frozen=True, tag="described"):
    segments: list[SegmentDescriptor]


TransferCall = DescribeRequest
