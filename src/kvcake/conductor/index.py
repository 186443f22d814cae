"""The global prefix index: which instance holds which KV block.

Two maps that always agree, so both questions are cheap::

    holders:  block hash  -> {instance ids}     (who can serve this block)
    blocks:   instance id -> {block hashes}     (what to forget when it goes)

Instances report changes as numbered :class:`KVEvent` s. A missing number means a lost
report: the index stops there and the caller fetches a snapshot (:meth:`PrefixIndex.replace`).
Hashes are chained, so a leading match of ``n`` blocks means the whole ``n``-block prefix.

The Conductor also records what it just sent to an instance (:meth:`PrefixIndex.insert`),
before any event says so; those blocks stay unconfirmed until one does, and a request that
ends before its prefill takes back the ones it added (:meth:`PrefixIndex.retract`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvcake.common.errors import InvalidParamsError
from kvcake.common.hashing import DIGEST_SIZE
from kvcake.wire.conductor import EVENT_KINDS, KVEvent


class PrefixIndex:
    """Block hash → instance ids, fed by sequence-numbered events; no I/O."""

    def __init__(self) -> None:
        self._holders: dict[bytes, set[str]] = {}
        self._blocks: dict[str, set[bytes]] = {}
        self._last_seq: dict[str, int] = {}
        self._unconfirmed: dict[str, set[bytes]] = {}  # inserted, no event about them since

    # ----- instances
    def add_instance(self, instance_id: str) -> None:
        """Know ``instance_id`` (holding nothing, before seq 1) if it is not known yet."""
        self._blocks.setdefault(instance_id, set())
        self._last_seq.setdefault(instance_id, 0)

    def remove_instance(self, instance_id: str) -> None:
        """Forget ``instance_id`` and everything it held; a no-op when unknown."""
        for block in self._blocks.pop(instance_id, set()):
            self._discard(instance_id, block)
        self._last_seq.pop(instance_id, None)
        self._unconfirmed.pop(instance_id, None)

    @property
    def instance_ids(self) -> list[str]:
        return sorted(self._blocks)

    def last_seq(self, instance_id: str) -> int:
        """The last event number applied for ``instance_id`` (0 before any)."""
        return self._last_seq.get(instance_id, 0)

    # ----- updates
    def apply(self, instance_id: str, events: Sequence[KVEvent]) -> bool:
        """Apply ``events`` in order. Numbers already applied are skipped (a resent report is
        harmless). At a gap, stop and return ``False``: the caller must fetch a snapshot.
        A malformed event raises ``InvalidParamsError`` before anything is applied."""
        for event in events:
            _check_event(instance_id, event)
        self.add_instance(instance_id)
        for event in events:
            last = self._last_seq[instance_id]
            if event.seq <= last:
                continue
            if event.seq != last + 1:
                return False
            self._apply_one(instance_id, event)
            self._last_seq[instance_id] = event.seq
        return True

    def replace(self, instance_id: str, seq: int, block_hashes: Iterable[bytes]) -> None:
        """Make ``block_hashes`` exactly what ``instance_id`` holds, as of event ``seq``."""
        hashes = list(block_hashes)
        _check_hashes(instance_id, hashes)
        self.remove_instance(instance_id)
        self.add_instance(instance_id)
        self._store(instance_id, hashes)
        self._last_seq[instance_id] = seq

    def insert(self, instance_id: str, block_hashes: Iterable[bytes]) -> list[bytes]:
        """Record blocks the Conductor itself just sent there (no event number): the request
        it routed will compute or pull them. A later event or snapshot corrects it. Returns
        the blocks it added (the instance was not known to hold them)."""
        hashes = list(block_hashes)
        _check_hashes(instance_id, hashes)
        self.add_instance(instance_id)
        held = self._blocks[instance_id]
        added = [block for block in dict.fromkeys(hashes) if block not in held]
        self._store(instance_id, added)
        self._unconfirmed.setdefault(instance_id, set()).update(added)
        return added

    def retract(self, instance_id: str, block_hashes: Iterable[bytes]) -> None:
        """Forget blocks :meth:`insert` added that no event has confirmed since: the request
        that was to compute or pull them there ended first."""
        unconfirmed = self._unconfirmed.get(instance_id)
        if not unconfirmed:
            return
        held = self._blocks[instance_id]
        for block in block_hashes:
            if block in unconfirmed:
                unconfirmed.remove(block)
                held.remove(block)
                self._discard(instance_id, block)

    def _apply_one(self, instance_id: str, event: KVEvent) -> None:
        self._unconfirmed.get(instance_id, set()).difference_update(event.block_hashes)
        if event.kind == "stored":
            self._store(instance_id, event.block_hashes)
        elif event.kind == "removed":
            held = self._blocks[instance_id]
            for block in event.block_hashes:
                if block in held:
                    held.remove(block)
                    self._discard(instance_id, block)
        else:  # cleared
            for block in self._blocks[instance_id]:
                self._discard(instance_id, block)
            self._blocks[instance_id] = set()
            self._unconfirmed.pop(instance_id, None)

    def _store(self, instance_id: str, block_hashes: Iterable[bytes]) -> None:
        held = self._blocks[instance_id]
        for block in block_hashes:
            held.add(block)
            self._holders.setdefault(block, set()).add(instance_id)

    def _discard(self, instance_id: str, block: bytes) -> None:
        holders = self._holders[block]
        holders.discard(instance_id)
        if not holders:
            del self._holders[block]

    # ----- queries
    def match(self, instance_id: str, block_hashes: Sequence[bytes]) -> int:
        """How many leading ``block_hashes`` ``instance_id`` holds (0 when unknown); stops at
        the first miss, so the cost is the match length."""
        held = self._blocks.get(instance_id, set())
        for position, block in enumerate(block_hashes):
            if block not in held:
                return position
        return len(block_hashes)

    def match_all(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        """:meth:`match` for every known instance, 0 included, in id order."""
        return {instance_id: self.match(instance_id, block_hashes)
                for instance_id in self.instance_ids}

    def holders(self, block_hash: bytes) -> frozenset[str]:
        return frozenset(self._holders.get(block_hash, ()))

    def block_hashes(self, instance_id: str) -> frozenset[bytes]:
        """Every block indexed for ``instance_id`` (empty when unknown)."""
        return frozenset(self._blocks.get(instance_id, ()))

    def num_blocks(self, instance_id: str) -> int:
        """Blocks indexed for ``instance_id`` (0 when unknown)."""
        return len(self._blocks.get(instance_id, ()))

    def check_integrity(self) -> None:
        """Assert that the two maps agree and hold no empty entries."""
        assert self._blocks.keys() == self._last_seq.keys()
        pairs = {(i, b) for i, blocks in self._blocks.items() for b in blocks}
        reverse = {(i, b) for b, holders in self._holders.items() for i in holders}
        assert pairs == reverse, "holders and blocks disagree"
        assert all(self._holders.values()), "a block with no holder is still indexed"
        assert all(unconfirmed <= self._blocks[i] for i, unconfirmed in
                   self._unconfirmed.items()), "an unconfirmed block is not held"


def _check_event(instance_id: str, event: KVEvent) -> None:
    if event.kind not in EVENT_KINDS:
        raise InvalidParamsError(f"KV event {event.seq} from {instance_id!r}: kind must be one "
                                 f"of {', '.join(EVENT_KINDS)}; got {event.kind!r}")
    if event.seq < 1:
        raise InvalidParamsError(f"KV event from {instance_id!r}: seq must be >= 1, "
                                 f"got {event.seq}")
    _check_hashes(instance_id, event.block_hashes)


def _check_hashes(instance_id: str, block_hashes: Sequence[bytes]) -> None:
    for block in block_hashes:
        if len(block) != DIGEST_SIZE:
            raise InvalidParamsError(f"block hash for {instance_id!r} must be {DIGEST_SIZE} "
                                     f"bytes, got {len(block)}")
