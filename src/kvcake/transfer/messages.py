"""Control messages of the transfer channel (encoded by :mod:`kvcake.common.codec`).

A describe names at most ``MAX_SEGMENT_NAMES`` segments (checked while the call is decoded:
a longer list gets ``INVALID_PARAMS`` and the server serves on), and is answered with at most
as many descriptors.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from kvcake.transfer.segment import SegmentDescriptor

MAX_SEGMENT_NAMES = 4096


class DescribeRequest(msgspec.Struct, frozen=True, tag="describe"):
    """Ask a peer for the descriptors of its segments (all of them when ``names`` is empty;
    at most ``MAX_SEGMENT_NAMES`` names)."""

    names: Annotated[list[str], msgspec.Meta(max_length=MAX_SEGMENT_NAMES)] = []


class DescribeReply(msgspec.Struct, frozen=True, tag="described"):
    segments: Annotated[list[SegmentDescriptor], msgspec.Meta(max_length=MAX_SEGMENT_NAMES)]


TransferCall = DescribeRequest
