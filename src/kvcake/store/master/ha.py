"""High availability: masters elect a leader in etcd, and the leader persists its state there.

Election: each master campaigns by creating ``<prefix>leader`` under an etcd lease of
``leader_ttl_s`` (a transaction that succeeds only while the key does not exist). The winner
restores the journal (:mod:`kvcake.store.master.journal`), starts serving, and publishes its RPC
endpoint in the key; standbys wait for the key to vanish, which it does when the leader's
lease lapses (a dead or cut-off leader) or is revoked (a clean shutdown). Clients and nodes
given ``etcd://HOST:PORT`` read the key to find the leader
(:func:`kvcake.store.leader.find_leader`).

Persistence (:class:`Persistence`): changes are flushed by one task, as soon as the previous
flush is done, so concurrent puts share one etcd round trip (group commit). Every etcd
transaction is fenced on the leader key's create revision: a deposed leader's writes fail,
and it steps down. What this gives:

- a ``put_end``, ``remove`` or ``remove_all`` is answered only once its records are in etcd,
  so an acknowledged put survives a failover while one of its replicas' nodes lives, and an
  acknowledged removal stays removed;
- memory of a removed or evicted object is reused only after its record is gone, so a new
  leader never points a reader at bytes that were overwritten;
- puts still open at a failover fail at ``put_end`` (OBJECT_NOT_FOUND on the new leader) and
  their writers retry; the new leader holds new puts for ``put_fence_s`` so that a write
  still in flight to memory the old leader handed out lands before that memory is reused;
- leases, LRU order (restored oldest-written first) and counters are not persisted.

A leader that cannot refresh its lease for ``leader_ttl_s`` stops serving before a standby
can have taken over. The pyetcd client is synchronous: every call runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

from kvcake.common import codec
from kvcake.common.errors import ErrorCode, KvcakeError, MetadataError
from kvcake.common.etcd import guarded, read_prefix
from kvcake.common.log import get_logger
from kvcake.store.leader import Layout, LeaderRecord
from kvcake.store.master.journal import (
    ChangeSet,
    ObjectRecord,
    SegmentRecord,
    Write,
    writes_for,
)
from kvcake.store.master.service import MasterService

log = get_logger(__name__)

_SAFE_SHARE = 0.8  # of the lease TTL a leader trusts its last renewal for
MAX_TXN_OPS = 100  # etcd's default --max-txn-ops is 128
MAX_TXN_BYTES = 1 << 20  # etcd's default --max-request-bytes is 1.5 MiB


class LeadershipLostError(KvcakeError):
    """This master is no longer the leader (its lease lapsed, or another master won)."""

    default_code = ErrorCode.ETCD_TRANSACTION_FAIL


class LeaderElection:
    """One master's campaign. ``uid`` names this term; ``fence`` guards every write."""

    def __init__(self, client: Any, layout: Layout, ttl_s: int) -> None:
        self.client = client
        self.layout = layout
        self.ttl_s = ttl_s
        self.uid = uuid.uuid4().hex
        self._lease: Any = None
        self._revision = 0
        self._refreshed = 0.0

    def try_win(self) -> bool:
        """One attempt: create the leader key under a new lease if it is absent."""
        lease = guarded(lambda: self.client.lease(self.ttl_s))
        tx = self.client.transactions
        won, _ = guarded(lambda: self.client.transaction(
            compare=[tx.create(self.layout.leader) == 0],
            success=[tx.put(self.layout.leader, self._value(""), lease)], failure=[]))
        if not won:
            guarded(lease.revoke)
            return False
        _, meta = guarded(lambda: self.client.get(self.layout.leader))
        self._lease, self._revision = lease, meta.create_revision
        self._refreshed = time.monotonic()
        return True

    def publish(self, endpoint: str, metrics_endpoint: str) -> None:
        """Name the endpoint clients should use (the key keeps this term's lease)."""
        self.commit([(self.layout.leader, self._value(endpoint, metrics_endpoint))],
                     lease=self._lease)

    def refresh(self) -> None:
        """Keep the lease alive; :class:`LeadershipLostError` once it cannot be."""
        sent = time.monotonic()  # etcd renewed the lease after this, never before
        try:
            replies = guarded(self._lease.refresh)
            if replies and replies[0].TTL > 0:
                self._refreshed = sent
                return
            raise LeadershipLostError("the leader lease has expired")
        except MetadataError as exc:
            if not self.confirmed():
                raise LeadershipLostError(f"cannot refresh the leader lease: {exc}") from exc
            log.warning("leader lease refresh failed, retrying: %s", exc)

    def confirmed(self) -> bool:
        """Whether the lease surely still holds: renewed less than 0.8 TTL ago. A leader
        serves only while this is true, so it never serves beside its successor, even
        when a refresh call hangs."""
        return time.monotonic() - self._refreshed < self.ttl_s * _SAFE_SHARE

    def commit(self, writes: list[Write], lease: Any = None) -> None:
        """Apply ``writes`` in fenced transactions; :class:`LeadershipLostError` if this
        term is over."""
        tx = self.client.transactions
        for chunk in _chunks(writes):
            ops = [tx.put(k, v, lease) if v is not None else tx.delete(k) for k, v in chunk]
            if not self._fenced(ops):
                raise LeadershipLostError("another master leads now; this one steps down")

    def _fenced(self, ops: list[Any]) -> bool:
        tx = self.client.transactions
        ok, _ = guarded(lambda: self.client.transaction(
            compare=[tx.create(self.layout.leader) == self._revision], success=ops, failure=[]))
        return bool(ok)

    def resign(self) -> None:
        if self._lease is not None:
            try:
                guarded(self._lease.revoke)
            except MetadataError as exc:  # the TTL ends the term anyway
                log.warning("could not revoke the leader lease: %s", exc)
            self._lease = None

    def _value(self, endpoint: str, metrics_endpoint: str = "") -> bytes:
        return codec.encode(LeaderRecord(self.uid, endpoint, metrics_endpoint))


def _chunks(writes: list[Write]) -> list[list[Write]]:
    chunks: list[list[Write]] = [[]]
    size = 0
    for write in writes:
        nbytes = len(write[0]) + len(write[1] or b"")
        if chunks[-1] and (len(chunks[-1]) >= MAX_TXN_OPS or size + nbytes > MAX_TXN_BYTES):
            chunks.append([])
            size = 0
        chunks[-1].append(write)
        size += nbytes
    return [c for c in chunks if c]


def load_journal(client: Any, layout: Layout) -> tuple[list[SegmentRecord],
                                                       list[tuple[str, ObjectRecord]]]:
    """Segment records, and object records oldest-written first (the LRU order to restore)."""
    segments = [codec.decode(v, SegmentRecord) for v, _ in read_prefix(client, layout.segments)]
    rows = read_prefix(client, layout.objects)
    rows.sort(key=lambda row: row[1].mod_revision)
    skip = len(layout.objects.encode())
    objects = [(meta.key[skip:].decode(), codec.decode(value, ObjectRecord))
               for value, meta in rows]
    return segments, objects


@dataclass(frozen=True)
class Flush:
    changes: ChangeSet
    done: asyncio.Future[None]


class Persistence:
    """The leader's flusher: marks changes in ``service.changes``, writes them in fenced
    transactions, then lets the service reuse memory whose records are gone."""

    def __init__(self, service: MasterService, election: LeaderElection, idle_s: float) -> None:
        self.service = service
        self.election = election
        self.idle_s = idle_s
        service.changes = ChangeSet()
        self._next: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wake = asyncio.Event()
        self._flushing: set[str] = set()  # objects in the write under way

    def pending(self, key: str) -> bool:
        """Whether ``key``'s latest change may not be in etcd yet (changed since the last
        flush, or in the one under way)."""
        changes = self.service.changes
        return key in self._flushing or (changes is not None and key in changes.objects)

    def durable(self) -> asyncio.Future[None]:
        """Resolves once every change made so far is in etcd."""
        self._wake.set()
        return self._next

    async def run(self) -> None:
        """Flush forever; raises :class:`LeadershipLostError` when the term ends."""
        while True:
            with contextlib.suppress(TimeoutError):  # flush what nobody waits for, too
                await asyncio.wait_for(self._wake.wait(), self.idle_s)
            self._wake.clear()
            await self._flush(self._take())

    def _take(self) -> Flush:
        assert self.service.changes is not None
        flush = Flush(self.service.changes, self._next)
        self.service.changes = ChangeSet()
        self._next = asyncio.get_running_loop().create_future()
        return flush

    async def _flush(self, flush: Flush) -> None:
        self._flushing = flush.changes.objects
        try:
            if flush.changes.objects or flush.changes.segments:
                writes = writes_for(self.service, flush.changes, self.election.layout)
                await asyncio.to_thread(self.election.commit, writes)
        except KvcakeError as exc:
            _fail(flush.done, exc)
            _fail(self._next, exc)
            raise
        finally:
            self._flushing = set()
        self.service.release_frees(flush.changes.frees)
        if not flush.done.done():
            flush.done.set_result(None)


def _fail(future: asyncio.Future[None], exc: KvcakeError) -> None:
    if not future.done():
        future.set_exception(KvcakeError(f"state not persisted: {exc}",
                                         ErrorCode.ETCD_OPERATION_ERROR))
        future.exception()  # retrieved: a future nobody awaited must not warn
