"""vLLM's KV events, as kvcake's Conductor indexes them: an instance's cached blocks under
kvcake's chained prefix hashes. No I/O.

vLLM publishes every change to its prefix cache (``--kv-events-config``) as msgpack batches
``[ts, events, dp_rank]`` whose events are maps tagged by ``type``: ``BlockStored`` (block
hashes, the parent block's hash, the blocks' token ids, the block size), ``BlockRemoved``
(block hashes) and ``AllBlocksCleared``. :class:`CacheView` re-hashes the stored blocks'
tokens the way the Conductor hashes prompts (:mod:`kvcake.common.hashing`, with the view's
salt), so vLLM's own hash scheme (its seed, its pickling) never reaches the Conductor; vLLM's
hashes serve only to find a block's parent and to forget removed blocks.
"""

from __future__ import annotations

from typing import Any

import msgspec

from kvcake.common.hashing import ROOT_DIGEST, hash_block
from kvcake.common.log import get_logger

log = get_logger(__name__)


def _key(block_hash: Any) -> bytes | int:
    return bytes(block_hash) if isinstance(block_hash, (bytes, bytearray)) else int(block_hash)


class CacheView:
    """One instance's cached blocks (kvcake's hashes), and the changes not yet reported."""

    def __init__(self, salt: bytes) -> None:
        self.salt = salt
        self._of: dict[bytes | int, bytes] = {}  # vLLM's hash -> kvcake's
        self._changes: list[tuple[str, bytes]] = []
        self.num_orphans = 0  # stored blocks whose parent the view never saw

    def apply(self, payload: bytes) -> None:
        """One published batch; an undecodable one is logged and skipped."""
        try:
            batch = msgspec.msgpack.decode(payload)
            events = batch[1]
        except (msgspec.DecodeError, IndexError, TypeError) as exc:
            log.warning("skipped a KV event batch vLLM sent: %r", exc)
            return
        for event in events:
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "BlockStored":
                self._stored(event)
            elif kind == "BlockRemoved":
                self._removed(event)
            elif kind == "AllBlocksCleared":
                self._of.clear()
                self._changes.append(("cleared", b""))

    def _stored(self, event: dict[str, Any]) -> None:
        parent = event.get("parent_block_hash")
        digest = ROOT_DIGEST if parent is None else self._of.get(_key(parent))
        if digest is None:
            self.num_orphans += 1
            return
        size, tokens = int(event["block_size"]), event["token_ids"]
        for i, block_hash in enumerate(event["block_hashes"]):
            digest = hash_block(digest, tokens[i * size:(i + 1) * size], self.salt)
            self._of[_key(block_hash)] = digest
            self._changes.append(("stored", digest))

    def _removed(self, event: dict[str, Any]) -> None:
        for block_hash in event["block_hashes"]:
            digest = self._of.pop(_key(block_hash), None)
            if digest is not None:
                self._changes.append(("removed", digest))

    def take_changes(self) -> list[tuple[str, bytes]]:
        changes, self._changes = self._changes, []
        return changes

    def hashes(self) -> list[bytes]:
        return list(self._of.values())
