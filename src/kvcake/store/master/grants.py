"""The master's half of grants: the keys nodes hand it at mount, and signed replica handles.

A node running with a cluster token sends its segment's grant key in ``MountSegment``; the
master never reveals it (``DescribeSegments`` answers descriptors only). Each replica handle
the master gives out carries a grant for exactly that replica's bytes: WRITE for a put (valid
for ``put_timeout_s``, after which the master reclaims the space anyway), READ for a get
(valid for the lease, during which the object cannot move). One grant per replica, whatever
the batch: a client presents it ahead of its frames on the connection it uses, so a batch of
reads costs no extra round trip (:mod:`kvcake.transfer.grants`). Segments mounted without a
key (no token) get plain handles: nothing changes for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from kvcake.transfer.grants import GrantMode, sign_grant
from kvcake.wire.store import ReplicaHandle


@dataclass(frozen=True)
class _SegmentKey:
    name: str
    key: bytes


class ReplicaGrants:
    """Grant keys by the master's segment id; ``clock`` is wall time (grants expire on it)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._keys: dict[int, _SegmentKey] = {}
        self._clock = clock

    def learn(self, segment_id: int, name: str, key: bytes) -> None:
        if key:
            self._keys[segment_id] = _SegmentKey(name, key)

    def forget(self, segment_id: int) -> None:
        self._keys.pop(segment_id, None)

    def sign(self, handles: list[ReplicaHandle], length: int, mode: GrantMode,
             ttl_s: float) -> list[ReplicaHandle]:
        """``handles`` with a grant for ``length`` bytes at each (where its node gave a key)."""
        if not self._keys or length <= 0:
            return handles
        expires_s = self._clock() + ttl_s
        return [self._signed(handle, length, mode, expires_s) for handle in handles]

    def _signed(self, handle: ReplicaHandle, length: int, mode: GrantMode,
                expires_s: float) -> ReplicaHandle:
        segment = self._keys.get(handle.segment_id)
        if segment is None:
            return handle
        grant = sign_grant(segment.key, segment.name, handle.offset, length, mode, expires_s)
        return msgspec.structs.replace(handle, grant=grant)
