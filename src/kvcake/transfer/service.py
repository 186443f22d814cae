"""The segment table: what a transfer server serves, with every check, and no I/O.

The TCP server asks it to resolve ``(segment_id, offset, length)`` into memory and to answer
control calls; unit tests drive it directly. With ``require_grants`` each segment gets a
grant key at registration and frames must fall inside grants (:mod:`kvcake.transfer.grants`).
"""

from __future__ import annotations

from kvcake.common.errors import (
    ErrorCode,
    InvalidParamsError,
    KvcakeError,
    SegmentNotFoundError,
)
from kvcake.transfer.grants import GrantMode, GrantTable, new_grant_key, sign_grant
from kvcake.transfer.handover import FdRequest
from kvcake.transfer.messages import DescribeReply, DescribeRequest, TransferCall
from kvcake.transfer.segment import Segment, SegmentDescriptor


def check_range(name: str, size: int, offset: int, length: int) -> None:
    """Raise ``BUFFER_OVERFLOW`` unless ``[offset, offset+length)`` lies inside ``size``."""
    if offset < 0 or length < 0 or offset + length > size:
        raise InvalidParamsError(
            f"range [{offset}, {offset + length}) is outside segment {name!r} of {size} bytes",
            ErrorCode.BUFFER_OVERFLOW,
        )


class SegmentTable:
    """Segments registered by this process, by id and by name."""

    def __init__(self, host_id: str, require_grants: bool = False) -> None:
        self.host_id = host_id
        self.endpoint = ""  # set once the server knows its port
        self.shm_socket = ""  # set once the handover server listens
        self.requires_grants = require_grants
        self.grant_keys: dict[str, bytes] = {}  # by segment name, when grants are required
        self._by_id: dict[int, Segment] = {}
        self._by_name: dict[str, Segment] = {}
        self._next_id = 1

    def next_segment_id(self) -> int:
        segment_id, self._next_id = self._next_id, self._next_id + 1
        return segment_id

    def add(self, segment: Segment) -> None:
        if segment.name in self._by_name:
            raise KvcakeError(
                f"segment {segment.name!r} is already registered", ErrorCode.SEGMENT_ALREADY_EXISTS
            )
        assert segment.segment_id not in self._by_id
        self._by_id[segment.segment_id] = segment
        self._by_name[segment.name] = segment
        if self.requires_grants:
            self.grant_keys[segment.name] = new_grant_key()

    def remove(self, name: str) -> Segment:
        segment = self._by_name.pop(name, None)
        if segment is None:
            raise SegmentNotFoundError(f"no local segment named {name!r}")
        del self._by_id[segment.segment_id]
        self.grant_keys.pop(name, None)
        return segment

    def get(self, name: str) -> Segment:
        segment = self._by_name.get(name)
        if segment is None:
            raise SegmentNotFoundError(f"no local segment named {name!r}")
        return segment

    def names(self) -> list[str]:
        return list(self._by_name)

    def resolve(self, segment_id: int, offset: int, length: int) -> memoryview:
        """The bytes a frame addresses; typed errors for unknown ids and bad ranges."""
        segment = self._by_id.get(segment_id)
        if segment is None:
            raise SegmentNotFoundError(f"no segment with id {segment_id} on this peer")
        check_range(segment.name, segment.size, offset, length)
        return segment.view[offset : offset + length]

    def resolve_granted(self, grants: GrantTable, segment_id: int, offset: int, length: int,
                        mode: GrantMode, now_s: float) -> memoryview:
        """:meth:`resolve`, then ``ACCESS_DENIED`` unless one of ``grants`` covers it."""
        view = self.resolve(segment_id, offset, length)
        grants.check(self._by_id[segment_id].name, offset, length, mode, now_s)
        return view

    def sign(self, name: str, offset: int, length: int, mode: GrantMode, expires_s: float,
             stride: int = 0, count: int = 1) -> bytes:
        """A grant on our own segment ``name`` (``b""`` when grants are not required)."""
        if not self.requires_grants:
            return b""
        segment = self.get(name)
        check_range(name, segment.size, offset, stride * (count - 1) + length)
        return sign_grant(self.grant_keys[name], name, offset, length, mode, expires_s,
                          stride, count)

    def descriptor(self, name: str, registrant: str = "") -> SegmentDescriptor:
        segment = self.get(name)
        if registrant not in segment.registrants:
            raise InvalidParamsError(f"segment {name!r} is not bound to {registrant!r}")
        return segment.descriptor(self.host_id, self.endpoint, self.shm_socket, registrant)

    def bind(self, name: str, registrant: str) -> None:
        """Let ``registrant`` publish our segment ``name`` (peers then map it for it)."""
        self.get(name).registrants.add(registrant)

    def hand_over(self, request: FdRequest) -> int:
        """The memfd the handover server sends for ``request`` (runs on its thread)."""
        segment = self._by_name.get(request.name)
        if segment is None:
            raise SegmentNotFoundError(f"no local segment named {request.name!r}")
        return segment.hand_over(request)

    def handle_call(self, call: TransferCall) -> DescribeReply:
        if isinstance(call, DescribeRequest):
            names = call.names or self.names()
            return DescribeReply([self.descriptor(name) for name in names])
        raise InvalidParamsError(f"unknown transfer call {type(call).__name__}")

    def close(self) -> None:
        for segment in self._by_id.values():
            segment.close()
        self._by_id.clear()
        self._by_name.clear()
        self.grant_keys.clear()
