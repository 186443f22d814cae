"""Reads across the network that do not wait for the master first: a key this client read
before, whose lease from that read still runs, is read again from the replica it was found
on *while* the master is asked, and the bytes count only if the answer names the same
object with that replica. One round trip then hides behind the other::

    Send GetReplicas ──────────────────┐
    read the replica seen last time    │   (the node and the master answer at once)
    Receive ───────────────────────────┘
      same object (its id), that replica among its replicas, read before the old lease ran out?
        yes: the bytes read are the value          no: ask and read as before

Why the bytes are the value: a master gives each put of a key a new object id, counting
from a random start of 60 bits (so two masters, after a restart or a failover, give out the
same id only by a chance too small to matter), so the object the answer names existed from
the earlier answer to this one. While the earlier lease held, that replica's memory could
not be reused: a leased object is neither evicted nor removed without force, memory a leased
object leaves (an offload to disk, a forced remove, an upsert) is held until its lease ends,
and a lost segment is mounted again under a new id. So the memory the read saw was that
object's, and an object's bytes never change once complete.

Only keys on replicas reached over the network are read this way: a same-host replica is
read through the master's location table or mapped in place (:mod:`kvcake.store.ops`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvcake.store.replica_io import ReplicaIo
from kvcake.wire import store as m
from kvcake.wire.store import ReplicaHandle

_SEEN_KEYS = 1 << 16  # keys remembered; forgotten all at once beyond


@dataclass(frozen=True)
class Sighting:
    """Where a key's object was found, and until when that answer's lease holds it there
    (this client's monotonic clock, counted from before the question)."""

    object_id: int
    size: int
    handle: ReplicaHandle
    until: float


@dataclass(frozen=True)
class Guess:
    """The answer the master is expected to give for some keys, and what it rests on."""

    reply: m.GetReplicasReply  # as the master would give it: one replica a key
    sightings: list[Sighting]

    def confirmed(self, found: m.GetReplicasReply, read_by: float) -> bool:
        """Whether ``found`` names each key's sighted object with its sighted replica, and
        the reads ended (at ``read_by``) while every sighting's lease held."""
        if read_by > min(s.until for s in self.sightings):
            return False
        return all(code == 0 and object_id == seen.object_id and size == seen.size
                   and any(_same_place(h, seen.handle) for h in handles)
                   for seen, code, size, handles, object_id in zip(
                       self.sightings, found.codes, found.sizes, found.replicas,
                       found.object_ids or [0] * len(self.sightings), strict=True))


class Sightings:
    """Where this client last found each key, from the master's answers to its reads."""

    def __init__(self, replicas: ReplicaIo) -> None:
        self._replicas = replicas
        self._seen: dict[str, Sighting] = {}
        self.confirmed = 0  # reads overlapped with the master's answer, and kept
        self.refuted = 0  # ... read again after it (the object moved or changed, a failure)

    def count(self, kept: bool) -> None:
        """Count one overlapped read, kept or not."""
        if kept:
            self.confirmed += 1
        else:
            self.refuted += 1

    def forget(self) -> None:
        """Forget every key: the master restarted, its segments are looked up again (their
        grants and places would only be refuted)."""
        self._seen.clear()

    def learn(self, keys: Sequence[str], found: m.GetReplicasReply, until: float) -> None:
        """Remember what ``found`` says of ``keys``, leased until ``until``."""
        seen = self._seen
        if len(seen) > _SEEN_KEYS:
            seen.clear()
        ids = found.object_ids or [0] * len(keys)
        for key, code, size, handles, object_id in zip(keys, found.codes, found.sizes,
                                                       found.replicas, ids, strict=True):
            if code == 0 and object_id and handles:
                seen[key] = Sighting(object_id, size, handles[0], until)
            else:
                seen.pop(key, None)

    def guess(self, keys: Sequence[str]) -> Guess | None:
        """The expected answer for ``keys``, when each was seen on a replica reached over
        the network and its lease from then still holds; else ``None``."""
        now, seen, segments = time.monotonic(), self._seen, self._replicas.segments
        sightings = []
        for key in keys:
            sighting = seen.get(key) if isinstance(key, str) else None
            if sighting is None or sighting.until <= now:
                return None
            segment = segments.get(sighting.handle.segment_id)
            if segment is None or segment.transport == "shm":
                return None
            sightings.append(sighting)
        reply = m.GetReplicasReply(0.0, [0] * len(keys), [s.size for s in sightings],
                                   [[s.handle] for s in sightings], 0.0,
                                   [s.object_id for s in sightings])
        return Guess(reply, sightings)


def _same_place(a: ReplicaHandle, b: ReplicaHandle) -> bool:
    return a.segment_id == b.segment_id and a.offset == b.offset
