"""Moving a client's bytes to and from replicas: the transfer engine's batches, the segments
they name (looked up through the master once, then cached), and on reads the best replica
first with a fallback to the next. No knowledge of keys beyond their index in a call.

Every method is a plan (:mod:`kvcake.store.steps`): it yields its master calls and transfer
batches to whichever driver runs it. A read of one key takes all its pieces
(:mod:`kvcake.store.pieces`) from one replica; if any fails, the key's next replica is
tried, same-host replicas (a memcpy, right in the plan) first::

    round 1:  key 0 <- replica A (shm)   key 1 <- replica C (tcp)  -> key 1 failed
    round 2:                             key 1 <- replica D (tcp)  -> done
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import msgspec

from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.log import get_logger
from kvcake.store.pieces import Piece
from kvcake.store.session import MasterSession
from kvcake.store.steps import Ask, Move, Plan
from kvcake.transfer import (
    MappedRange,
    RemoteSegment,
    SegmentDescriptor,
    TransferEngine,
    TransferOp,
    TransferRequest,
)
from kvcake.wire import store as m
from kvcake.wire.store import ReplicaHandle

log = get_logger(__name__)
Live = Callable[[], tuple[MasterSession, TransferEngine]]


class ReplicaIo:
    """``live()``: the session and engine to use (raises when the client is not set up).
    Its plans may run in several threads at once (the blocking driver runs them in the
    callers' threads)."""

    def __init__(self, live: Live) -> None:
        self._live = live
        self.segments: dict[int, RemoteSegment] = {}  # cleared when the master restarts
        self._attaching = threading.Lock()

    def read(self, found: m.GetReplicasReply, pieces: dict[int, list[Piece]],
             deadline: float) -> Plan[dict[int, int]]:
        """Read each key's pieces (by index into ``found``) from its best replica, trying
        the next one after a failure; 0 per key when done before ``deadline`` (its lease),
        else a code (``LEASE_EXPIRED``: the bytes may be stale)."""
        codes = dict.fromkeys(pieces, 0)
        pending = {i: self._ranked(found.replicas[i]) for i in pieces}
        while pending:
            order = list(pending)
            chosen = {i: pending[i].pop(0) for i in order}
            reads = [(i, shifted(chosen[i], offset), view) for i in order
                     for offset, view in pieces[i]]
            failed = {reads[j][0] for j in (yield from self.move(
                TransferOp.READ, [(h, v) for _, h, v in reads]))}
            for i in order:
                if i not in failed or not pending[i]:
                    codes[i] = ErrorCode.TRANSFER_FAIL if i in failed else 0
                    del pending[i]
        late = time.monotonic() > deadline
        return {i: ErrorCode.LEASE_EXPIRED if late and not c else c for i, c in codes.items()}

    def mapped(self, found: m.GetReplicasReply) -> Plan[list[MappedRange | None]]:
        """Each found value's same-host replica as memory of this process (``None``: the
        value is missing or has no replica reached through a mapping)."""
        _, engine = self._live()
        segments = yield from self.resolve([h.segment_id for hs in found.replicas for h in hs])
        return [None if code else _first_mapped(engine, segments, handles, size)
                for code, size, handles in zip(found.codes, found.sizes, found.replicas,
                                               strict=True)]

    def _ranked(self, handles: list[ReplicaHandle]) -> list[ReplicaHandle]:
        """Same-host replicas first: they are read with a memcpy."""
        known = self.segments
        return sorted(handles, key=lambda h: h.segment_id not in known
                      or known[h.segment_id].transport != "shm")

    def move(self, op: TransferOp,
             items: list[tuple[ReplicaHandle, memoryview]]) -> Plan[list[int]]:
        """Run one batch of transfers; the indices of the items that failed. Same-host
        copies run right here (:meth:`TransferEngine.copy`), with no step for the driver."""
        if not items:
            return []
        segments = yield from self.resolve([h.segment_id for h, _ in items])
        requests, failed = [], []
        for j, (handle, view) in enumerate(items):
            segment = segments.get(handle.segment_id)
            if segment is None:
                failed.append(j)
                continue
            requests.append((j, TransferRequest(op, segment, handle.offset, view, handle.grant)))
        _, engine = self._live()
        batch = [r for _, r in requests]
        errors = engine.copy(batch)
        if errors is None:  # some cross the network
            errors = yield Move(batch)
        failed += [j for (j, _), e in zip(requests, errors, strict=True) if e is not None]
        return failed

    def attach_all(self) -> Plan[None]:
        """Reach every segment the master knows now (mapped, where on this host), so that
        no first read waits for a handover. Best effort: what fails is left to the reads."""
        try:
            reply = yield Ask(m.DescribeSegments([], every=True), m.DescribeSegmentsReply)
        except KvcakeError as exc:
            log.debug("segments not reached ahead: %s", exc)
            return
        for descriptor in reply.descriptors:
            if descriptor is not None and descriptor.segment_id not in self.segments:
                try:
                    self._attach(descriptor.segment_id, descriptor)
                except KvcakeError as exc:
                    log.debug("segment %s not reached ahead: %s", descriptor.name, exc)

    def resolve(self, segment_ids: list[int]) -> Plan[dict[int, RemoteSegment]]:
        missing = sorted({i for i in segment_ids if i not in self.segments})
        if missing:
            reply = yield Ask(m.DescribeSegments(missing), m.DescribeSegmentsReply)
            for segment_id, descriptor in zip(missing, reply.descriptors, strict=True):
                if descriptor is not None:
                    self._attach(segment_id, descriptor)
        return self.segments

    def _attach(self, segment_id: int, descriptor: SegmentDescriptor) -> None:
        """Reach a segment once, whichever thread gets there first."""
        with self._attaching:
            if segment_id not in self.segments:
                _, engine = self._live()
                self.segments[segment_id] = engine.attach(descriptor)


def _first_mapped(engine: TransferEngine, segments: dict[int, RemoteSegment],
                  handles: list[ReplicaHandle], size: int) -> MappedRange | None:
    for handle in handles:
        segment = segments.get(handle.segment_id)
        mapped = segment and engine.map_range(segment, handle.offset, size)
        if mapped:
            return mapped
    return None


def shifted(handle: ReplicaHandle, delta: int) -> ReplicaHandle:
    """``handle``, ``delta`` bytes further into its replica (its grant covers the replica)."""
    return msgspec.structs.replace(handle, offset=handle.offset + delta) if delta else handle
