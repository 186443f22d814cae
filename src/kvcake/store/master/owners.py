"""The master's proof of who owns a mounted segment, and whether that owner still lives.

A mount names its segment with a descriptor the master cannot take on trust: it may point at
another process's segment. The master publishes every segment as ``store:<client>``, the
client that mounted it; same-host peers are handed the memfd only if its owner bound the
segment to that very name (:mod:`kvcake.transfer.handover`). When the master shares the
owner's host it asks for the memfd itself before it accepts the mount, so a forged mount is
refused at once, with the reason; and it keeps the owner's pidfd, so a node killed with
``kill -9`` is dropped before any later call (a put can no longer be acknowledged onto its
pages) instead of after ``client_ttl_s``.
"""

from __future__ import annotations

import asyncio
import select

from kvcake.common.auth import ClusterAuth
from kvcake.transfer.handover import OwnerProcess
from kvcake.transfer.segment import (
    SegmentDescriptor,
    local_host_id,
    offers_local_mapping,
    prove_ownership,
)


class SegmentOwners:
    """Pidfds of the same-host processes that mounted segments, by client id."""

    def __init__(self, auth: ClusterAuth, host_id: str = "") -> None:
        self._auth = auth
        self._host_id = host_id or local_host_id()
        self._owners: dict[str, OwnerProcess] = {}
        self._poller = select.poll()
        self._by_fd: dict[int, str] = {}

    def must_verify(self, descriptor: SegmentDescriptor) -> bool:
        """Whether a mount offers a same-host mapping on this master's host."""
        return offers_local_mapping(descriptor, self._host_id)

    async def verify(self, client_id: str, descriptor: SegmentDescriptor) -> None:
        """Raise ``ACCESS_DENIED`` unless the segment's owner hands it over for ``client_id``."""
        owner = await asyncio.to_thread(prove_ownership, descriptor, self._auth)
        self._watch(client_id, owner)

    def _watch(self, client_id: str, owner: OwnerProcess) -> None:
        old = self._owners.get(client_id)
        if old is not None and old.pid == owner.pid:
            owner.close()
            return
        self.forget(client_id)
        self._owners[client_id] = owner
        self._by_fd[owner.fd] = client_id
        self._poller.register(owner.fd, select.POLLIN)

    def dead(self) -> list[tuple[str, int]]:
        """``(client_id, pid)`` of watched owners that exited; they are forgotten."""
        gone = [(self._by_fd[fd], self._owners[self._by_fd[fd]].pid)
                for fd, _ in self._poller.poll(0)]
        for client_id, _ in gone:
            self.forget(client_id)
        return gone

    def forget(self, client_id: str) -> None:
        owner = self._owners.pop(client_id, None)
        if owner is not None:
            self._poller.unregister(owner.fd)
            del self._by_fd[owner.fd]
            owner.close()

    def close(self) -> None:
        for client_id in list(self._owners):
            self.forget(client_id)
