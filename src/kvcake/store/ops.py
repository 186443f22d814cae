"""What each store client call does, as plans (:mod:`kvcake.store.steps`): the master calls
it makes and the bytes it moves, with no I/O of its own. :class:`kvcake.store.AsyncStore`
runs them on its loop; the blocking driver (:mod:`kvcake.store.blocking`) runs the same
plans in the caller's thread.

Batch plans answer one int per key (bytes or 0 on success, a negative Mooncake code on
failure).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from kvcake.common.errors import ErrorCode, InvalidParamsError
from kvcake.store.arena_puts import ArenaPuts
from kvcake.store.overlapped import Guess, Sightings
from kvcake.store.pieces import Piece, check_keys, check_parts, concatenated, lay_out
from kvcake.store.replica_io import Live, ReplicaIo, shifted
from kvcake.store.replicate import AnyConfig, as_wire
from kvcake.store.steps import Ask, Plan, Receive, Send, Tell
from kvcake.store.table_reads import Staged, TableReads
from kvcake.transfer import MappedRange, TransferOp
from kvcake.wire import store as m

Range = tuple[str, int, memoryview]  # key, offset in its value, destination
Answer = tuple[m.GetReplicasReply, float]  # the master's answer, and when its leases end
_PLAIN = m.ReplicateConfig()  # puts of this config may go through an arena


class Staging(Protocol):
    """A byte budget values are read through (Mooncake's local buffer)."""

    def take(self, nbytes: int) -> bool: ...
    def give(self, nbytes: int) -> None: ...


@dataclass(frozen=True)
class InPlaceValues:
    """Values read where they lie. ``ranges[i]`` maps key ``i``'s replica on this host
    (``None``: missing, ``codes[i]`` says why, or no replica here: read it with a copy).
    Bytes read through them count only if :meth:`fresh` holds once read: every lease still
    held (the bytes were not freed and reused meanwhile) and every owner alive."""

    codes: list[int]
    ranges: list[MappedRange | None]
    deadline: float

    def fresh(self) -> bool:
        owners = {mapped.owner_alive for mapped in self.ranges if mapped is not None}
        return time.monotonic() <= self.deadline and all(alive() for alive in owners)


class StoreOps:
    """``live()``: the session and engine (raises when the client is not set up).
    ``scratch_bytes``: a pre-touched buffer :meth:`get_values` receives into before its one
    copy into ``bytes`` (fresh memory is slow to touch the first time)."""

    def __init__(self, live: Live, scratch_bytes: int = 0) -> None:
        self._live = live
        self.replicas = ReplicaIo(live)
        self.table = TableReads(live, self.replicas)  # the master's location table
        self.arena = ArenaPuts(live, self.replicas)  # same-host puts without asking
        self.sightings = Sightings(self.replicas)  # where keys were found, for reads over tcp
        self._scratch = memoryview(bytearray(1) * scratch_bytes)  # filled, so pre-touched
        self._scratch_lock = threading.Lock()

    def master_restarted(self) -> None:
        """Forget what the master told of segments and keys: it starts over."""
        self.replicas.segments.clear()
        self.sightings.forget()

    def _client_id(self) -> str:
        session, _ = self._live()
        return session.client_id

    # ----- writes
    def put_parts(self, keys: Sequence[str], parts: Sequence[Sequence[memoryview]],
                  config: AnyConfig | None = None, upsert: bool = False,
                  pipeline_end: bool = False) -> Plan[list[int]]:
        """Store each key's value, the concatenation of its ``parts``; 0 when stored, else a
        code. Without ``upsert`` a key that exists is kept (and answers 0: nothing to
        write); with it, it is replaced (its group and pins carried over, see
        :mod:`kvcake.store.master.puts`). ``pipeline_end``: return once the bytes are
        written and ``PutEnd`` is sent, where the master allows it
        (:mod:`kvcake.store.master.ends`)."""
        client_id = self._client_id()
        check_parts(keys, parts)
        check_keys(keys)  # before the arena takes any: a batch refused whole stores nothing
        sizes = [sum(v.nbytes for v in views) for views in parts]
        wire = as_wire(config, len(keys))
        ahead = 0 if upsert or wire != _PLAIN else (yield from self.arena.put(keys, parts,
                                                                              sizes))
        if ahead == len(keys):
            return [0] * ahead
        codes = yield from self._put_asking(client_id, keys[ahead:], parts[ahead:],
                                            sizes[ahead:], wire, upsert, pipeline_end)
        return [0] * ahead + codes

    def _put_asking(self, client_id: str, keys: Sequence[str],
                    parts: Sequence[Sequence[memoryview]], sizes: list[int],
                    wire: m.ReplicateConfig, upsert: bool, pipeline_end: bool
                    ) -> Plan[list[int]]:
        """Puts the master places: space first, then the bytes, then their end."""
        started = yield Ask(m.PutStart(client_id, list(keys), sizes, wire, upsert,
                                       pipeline_end), m.PutStartReply)
        codes = [0 if c == ErrorCode.OBJECT_ALREADY_EXISTS else c for c in started.codes]
        todo = [i for i, c in enumerate(started.codes) if c == 0]
        writes = [(i, shifted(h, offset), view) for i in todo for h in started.replicas[i]
                  for offset, view in concatenated(parts[i])]
        failed = yield from self.replicas.move(TransferOp.WRITE,
                                               [(h, v) for _, h, v in writes])
        bad = {writes[j][0] for j in failed}
        for i in bad:
            codes[i] = ErrorCode.TRANSFER_FAIL
        yield from self._finish_puts(client_id, [keys[i] for i in todo if i not in bad],
                                     [keys[i] for i in sorted(bad)], codes, keys,
                                     started.pipeline_end)
        return codes

    def _finish_puts(self, client_id: str, done: list[str], revoked: list[str],
                     codes: list[int], keys: Sequence[str], pipelined: bool) -> Plan[None]:
        index = {key: i for i, key in enumerate(keys)}
        if done and pipelined:
            yield Tell(m.PutEnd(client_id, done), m.CodesReply)
        elif done:
            ended = yield Ask(m.PutEnd(client_id, done), m.CodesReply)
            for key, code in zip(done, ended.codes, strict=True):
                codes[index[key]] = code
        if revoked:
            yield Ask(m.PutRevoke(client_id, revoked), m.CodesReply)

    # ----- reads
    def get_values(self, keys: Sequence[str],
                   staging: Staging | None = None) -> Plan[list[bytes | int]]:
        """Each key's bytes, or its negative code; one master round trip for all (none where
        the location table holds every key, :mod:`kvcake.store.table_reads`). With
        ``staging``, a value it has no room for answers ``INVALID_PARAMS``."""
        values = self.table.values(keys, Staged(staging))
        if values is not None:
            yield from self._touch(keys, read=True)
            return values
        guess = self.sightings.guess(keys)
        answer = None
        if guess is not None:
            values, answer = yield from self._values_guessed(keys, guess, staging)
            if values is not None:
                return values
        found, deadline = answer or (yield from self.find(keys))
        with Staged(staging) as take:
            _stage(found, take)
            here = InPlaceValues(found.codes, (yield from self.replicas.mapped(found)),
                                 deadline)
            if all(r is not None or c for r, c in zip(here.ranges, here.codes, strict=True)):
                values = [int(c) if r is None else bytes(r.view)  # one copy: no scratch
                          for r, c in zip(here.ranges, here.codes, strict=True)]
                if here.fresh():
                    return values  # else read again below, which says why
            with self._scratch_for(found) as scratch:
                views = _value_views(found, scratch)
                results = yield from self.read_found(found, [[v] for v in views], deadline)
                return [bytes(v) if r >= 0 else r for v, r in zip(views, results, strict=True)]

    def _values_guessed(self, keys: Sequence[str], guess: Guess, staging: Staging | None
                        ) -> Plan[tuple[list[bytes | int] | None, Answer | None]]:
        """:meth:`get_values` read where ``guess`` says, while the master is asked
        (:mod:`kvcake.store.overlapped`): the values (``None`` where the answer does not
        confirm them), and the answer (as :meth:`_read_guessed`)."""
        with Staged(staging) as take:
            _stage(guess.reply, take)
            with self._scratch_for(guess.reply) as scratch:
                views = _value_views(guess.reply, scratch)
                read, answer = yield from self._read_guessed(keys, guess, [[v] for v in views])
                if read is None:
                    return None, answer
                return [bytes(v) if r >= 0 else r
                        for v, r in zip(views, read, strict=True)], answer

    def _read_guessed(self, keys: Sequence[str], guess: Guess,
                      parts: Sequence[Sequence[memoryview]]
                      ) -> Plan[tuple[list[int] | None, Answer | None]]:
        """:meth:`read_found` over ``guess`` while the master is asked where ``keys`` are:
        what was read (``None`` where the answer does not confirm the guess, or a read
        failed), and the answer with its deadline to read from instead (``None`` when less
        than half its lease is left: the guessed read took that long, ask again)."""
        asked = time.monotonic()  # before the question leaves: leased no earlier
        ticket = yield Send(m.GetReplicas(check_keys(keys), self._client_id()),
                            m.GetReplicasReply)
        read = yield from self.read_found(guess.reply, parts, math.inf)
        read_by = time.monotonic()
        found = yield Receive(ticket)
        deadline = self._learn(keys, found, asked)
        kept = ErrorCode.TRANSFER_FAIL not in read and guess.confirmed(found, read_by)
        self.sightings.count(kept)
        fresh = time.monotonic() < deadline - found.lease_ttl_s / 2
        return (read if kept else None), ((found, deadline) if fresh else None)

    @contextmanager
    def _scratch_for(self, found: m.GetReplicasReply) -> Iterator[memoryview | None]:
        """The scratch buffer, when it is free and holds every found value."""
        total = sum(s for c, s in zip(found.codes, found.sizes, strict=True) if c == 0)
        if total > self._scratch.nbytes or not self._scratch_lock.acquire(blocking=False):
            yield None
            return
        try:
            yield self._scratch
        finally:
            self._scratch_lock.release()

    def get_into_parts(self, keys: Sequence[str],
                       parts: Sequence[Sequence[memoryview]]) -> Plan[list[int]]:
        """Read each key's value into its ``parts`` in order (the last ones may stay
        unused); bytes read, or a code (``BUFFER_OVERFLOW`` when they hold less). A read
        through the master that finishes after its lease ran out answers
        ``LEASE_EXPIRED``: its bytes may be stale (one through the location table is
        checked another way)."""
        self._live()
        check_parts(keys, parts)
        read = self.table.into(keys, parts)
        if read is not None:
            yield from self._touch(keys, read=True)
            return read
        guess = self.sightings.guess(keys)
        answer = None
        if guess is not None:
            read, answer = yield from self._read_guessed(keys, guess, parts)
            if read is not None:
                return read
        found, deadline = answer or (yield from self.find(keys))
        return (yield from self.read_found(found, parts, deadline))

    def get_into_here(self, key: str, view: memoryview) -> int | None:
        """One key's value copied into ``view`` from the location table, in the calling
        thread with no plan to run: bytes read, or ``BUFFER_OVERFLOW``. ``None`` where
        :meth:`get_into_parts` must run instead: the table cannot answer, or the master is
        due to be told of the read (that plan reads and tells it)."""
        if not isinstance(key, str) or self.table.due(key):
            return None
        read = self.table.into([key], [[view]])
        if read is None or self.table.due(key):  # due again: the table was another master's
            return None
        return read[0]

    def in_place(self, keys: Sequence[str]) -> Plan[InPlaceValues]:
        """Each key's value where it lies (see :class:`InPlaceValues`)."""
        found, deadline = yield from self.find(keys)
        return InPlaceValues(list(found.codes), (yield from self.replicas.mapped(found)),
                             deadline)

    def read_ranges(self, ranges: Sequence[Range]) -> Plan[list[int]]:
        """Read byte ranges of values: each ``(key, offset, view)`` fills ``view`` from the
        value's byte ``offset``; bytes read, or a code (``INVALID_PARAMS`` for a range past
        the value's end). One master round trip for all keys."""
        keys = list(dict.fromkeys(key for key, _, _ in ranges))
        found, deadline = yield from self.find(keys)
        index = {key: i for i, key in enumerate(keys)}
        results: list[int] = [0] * len(ranges)
        pieces: dict[int, list[Piece]] = {}
        owners: dict[int, list[int]] = {}
        for j, (key, offset, view) in enumerate(ranges):
            i = index[key]
            if found.codes[i] != 0 or offset < 0 or offset + view.nbytes > found.sizes[i]:
                results[j] = found.codes[i] or ErrorCode.INVALID_PARAMS
                continue
            if not view.nbytes:
                continue  # nothing to move: 0 bytes read
            pieces.setdefault(i, []).append((offset, view))
            owners.setdefault(i, []).append(j)
        codes = yield from self.replicas.read(found, pieces, deadline)
        for i, js in owners.items():
            for j in js:
                results[j] = codes[i] or ranges[j][2].nbytes
        return results

    def find(self, keys: Sequence[str]) -> Plan[Answer]:
        """Replicas (leased) of ``keys``, and the time their leases run out."""
        client_id = self._client_id()
        asked = time.monotonic()
        found = yield Ask(m.GetReplicas(check_keys(keys), client_id), m.GetReplicasReply)
        return found, self._learn(keys, found, asked)

    def _learn(self, keys: Sequence[str], found: m.GetReplicasReply, asked: float) -> float:
        """When the leases of ``found`` (asked at ``asked``) run out; remembered, with where
        each key was found."""
        deadline = asked + found.waited_s + found.lease_ttl_s  # leased no earlier
        self.sightings.learn(keys, found, deadline)
        return deadline

    def read_found(self, found: m.GetReplicasReply, parts: Sequence[Sequence[memoryview]],
                   deadline: float) -> Plan[list[int]]:
        results = list(found.codes)
        pieces: dict[int, list[Piece]] = {}
        for i, (code, size) in enumerate(zip(found.codes, found.sizes, strict=True)):
            laid = lay_out(parts[i], size) if code == 0 else None
            if code == 0 and laid is None:
                results[i] = ErrorCode.BUFFER_OVERFLOW
            elif laid is not None:
                pieces[i] = laid
        codes = yield from self.replicas.read(found, pieces, deadline)
        return [codes[i] or found.sizes[i] if i in pieces else int(c)
                for i, c in enumerate(results)]

    # ----- metadata
    def exist(self, keys: Sequence[str]) -> Plan[list[int]]:
        """1 present, 0 absent, negative code for a bad key."""
        present = self.table.exist(keys)
        if present is not None:
            yield from self._touch(keys, read=False)
            return present
        reply = yield Ask(m.Exist(check_keys(keys), self._client_id()), m.CodesReply)
        return reply.codes  # type: ignore[no-any-return]

    def _touch(self, keys: Sequence[str], read: bool) -> Plan[None]:
        """Keys answered from the location table: leased (and counted used) by the master
        as if it had been asked, without waiting for it (see :meth:`TableReads.to_touch`)."""
        due = self.table.to_touch(keys)
        if due:
            yield Tell(m.Touch(due, self._client_id(), read), m.CodesReply, harmless=True)

    def sizes(self, keys: Sequence[str]) -> Plan[list[int]]:
        found, _ = yield from self.find(keys)
        return [s if c == 0 else c for c, s in zip(found.codes, found.sizes, strict=True)]

    def query_replicas(self, keys: Sequence[str]) -> Plan[m.QueryReplicasReply]:
        """Every readable replica of each key, any tier (leases them, as a get does)."""
        reply = yield Ask(m.QueryReplicas(check_keys(keys), self._client_id()),
                          m.QueryReplicasReply)
        return reply  # type: ignore[no-any-return]

    def remove(self, keys: Sequence[str], force: bool = False) -> Plan[list[int]]:
        reply = yield Ask(m.Remove(check_keys(keys), force, self._client_id()), m.CodesReply)
        return reply.codes  # type: ignore[no-any-return]

    def remove_all(self, force: bool = False) -> Plan[int]:
        reply = yield Ask(m.RemoveAll(force, self._client_id()), m.CountReply)
        return reply.count  # type: ignore[no-any-return]

    def remove_by_regex(self, pattern: str, force: bool = False) -> Plan[int]:
        """Remove this tenant's keys that ``pattern`` (Python ``re``) matches; how many."""
        reply = yield Ask(m.RemoveByRegex(pattern, force, self._client_id()), m.CountReply)
        return reply.count  # type: ignore[no-any-return]

    def replica_clear(self, keys: Sequence[str], segment_name: str = "") -> Plan[list[str]]:
        """Drop this client's own objects among ``keys`` whose lease ran out (all replicas,
        or those on segments named ``segment_name``); the keys dropped."""
        reply = yield Ask(m.ReplicaClear(check_keys(keys), segment_name, self._client_id()),
                          m.KeysReply)
        return reply.keys  # type: ignore[no-any-return]

    def stats(self) -> Plan[m.Stats]:
        self._live()
        reply = yield Ask(m.GetStats(), m.Stats)
        return reply  # type: ignore[no-any-return]


def _stage(found: m.GetReplicasReply, take: Staged) -> None:
    """Take room for each found value; a value without room becomes ``INVALID_PARAMS`` (in
    ``found.codes``)."""
    for i, (code, size) in enumerate(zip(found.codes, found.sizes, strict=True)):
        if code == 0 and not take(size):
            found.codes[i] = ErrorCode.INVALID_PARAMS


def _value_views(found: m.GetReplicasReply, scratch: memoryview | None) -> list[memoryview]:
    """Where each found value is received: slices of ``scratch``, else fresh buffers."""
    views, position = [], 0
    for code, size in zip(found.codes, found.sizes, strict=True):
        length = size if code == 0 else 0
        if scratch is not None:
            views.append(scratch[position : position + length])
            position += length
        else:
            views.append(memoryview(bytearray(length)))
    return views


def check_lengths(keys: Sequence[str], buffers: Sequence[object], what: str) -> None:
    if len(keys) != len(buffers):
        raise InvalidParamsError(f"{len(keys)} keys but {len(buffers)} {what}")

