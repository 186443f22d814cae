"""The store connector: KV blocks of the paged cache to and from the kvcake store.

Keys are ``<model fingerprint>/<tenant>/<block hash hex>``; values follow
:mod:`kvcake.engine.kv.format`. The engine thread only copies: blocks are staged into a
pre-touched ring of record slots and the store traffic runs on the transfer engine's own
event loop, so saving never stalls a step. When every slot is busy (a slow store), a save is
dropped (and counted), never waited for. Loads are synchronous: the step that admits a
request needs the blocks before it computes the rest of the prompt.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kvcake.common.config import load_config
from kvcake.common.errors import KvcakeError
from kvcake.common.log import get_logger
from kvcake.engine.kv.format import HEADER_BYTES, BlockLayout
from kvcake.store.client import AsyncStore
from kvcake.store.config import StoreConfig
from kvcake.transfer import TransferEngine
from kvcake.transfer.config import TransferConfig
from kvcake.wire.kv import store_key, store_keys

log = get_logger(__name__)

_KNOWN_KEYS = 1 << 16  # keys remembered as stored (saves of them are skipped)


@dataclass
class ConnectorStats:
    lookups: int = 0
    matched_blocks: int = 0
    loaded_blocks: int = 0
    rejected_blocks: int = 0
    saved_blocks: int = 0
    dropped_blocks: int = 0
    failed_blocks: int = 0


def paged_layers(kv_cache: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """kvcake's KV cache ``(num_layers, 2, num_slots, num_kv_heads, head_dim)`` as one view
    per layer indexed by block: ``(num_blocks, 2, block_size, num_kv_heads, head_dim)``."""
    num_layers, _, num_slots = kv_cache.shape[:3]
    blocks = kv_cache.view(num_layers, 2, num_slots // block_size, block_size,
                           *kv_cache.shape[3:])
    return list(blocks.transpose(1, 2).unbind(0))


class StoreConnector:
    """Implements the scheduler's ``KVConnector`` protocol over an :class:`AsyncStore`.

    ``layers``: one tensor per layer whose first index is the block id; a stored block is
    every layer's ``layer[block_id]``, in layer order (kvcake's engine: :func:`paged_layers`;
    vLLM's: its per-layer cache tensors, whose bytes inside a block stay opaque)."""

    def __init__(self, store: AsyncStore, engine: TransferEngine, layout: BlockLayout,
                 layers: list[torch.Tensor], staging_blocks: int = 256) -> None:
        self.store = store
        self.transfer = engine
        self.io = engine.io
        self.layout = layout
        self.layers = layers
        self._block_shape = (len(layers), *layers[0].shape[1:])
        self._buffer = bytearray(1) * (staging_blocks * layout.record_bytes)  # pre-touched
        self._free = list(range(staging_blocks))
        self._verifier = ThreadPoolExecutor(2, thread_name_prefix="kv-verify")
        self._lock = threading.Lock()
        self._inflight = 0
        self._idle = threading.Event()
        self._idle.set()
        self._known: OrderedDict[str, None] = OrderedDict()
        self.stats = ConnectorStats()

    # -- KVConnector ---------------------------------------------------------------------

    def num_matched_blocks(self, prefix: str, block_hashes: list[bytes]) -> int:
        keys = store_keys(prefix, block_hashes)
        self.stats.lookups += 1
        try:
            codes = self.io.run(self.store.batch_is_exist(keys))
        except KvcakeError as exc:
            log.warning("store lookup failed, computing instead: %s", exc)
            return 0
        matched = next((i for i, c in enumerate(codes) if c != 1), len(codes))
        self.stats.matched_blocks += matched
        return matched

    def load(self, prefix: str, block_ids: list[int], block_hashes: list[bytes]) -> int:
        """Copy stored blocks into ``block_ids``; the count of leading blocks that were valid."""
        done = 0
        while done < len(block_ids):
            slots = self._take_slots(len(block_ids) - done, wait=True)
            try:
                valid = self._load_round(prefix, block_ids[done:done + len(slots)],
                                         block_hashes[done:done + len(slots)], slots)
            finally:
                self._give_slots(slots)
            done += valid
            if valid < len(slots):
                break
        self.stats.loaded_blocks += done
        return done

    def save(self, prefix: str, block_ids: list[int], block_hashes: list[bytes]) -> None:
        with self._lock:
            todo = [(b, h, key) for b, h in zip(block_ids, block_hashes, strict=True)
                    if (key := store_key(prefix, h)) not in self._known]
        slots = self._take_slots(len(todo), wait=False)
        self.stats.dropped_blocks += len(todo) - len(slots)
        if not slots:
            return
        todo = todo[:len(slots)]
        keys = [key for _, _, key in todo]
        views = [self._stage(slot, block_id, block_hash)
                 for slot, (block_id, block_hash, _) in zip(slots, todo, strict=True)]
        self._begin()
        future = asyncio.run_coroutine_threadsafe(self._put(keys, views, slots), self.io.loop)
        future.add_done_callback(lambda _: self._end())

    # -- loading -------------------------------------------------------------------------

    def _load_round(self, prefix: str, block_ids: Sequence[int],
                    block_hashes: Sequence[bytes], slots: list[int]) -> int:
        keys = store_keys(prefix, block_hashes)
        views = [self._record(slot) for slot in slots]
        try:
            codes = self.io.run(self.store.batch_get_into(keys, views))
        except KvcakeError as exc:
            log.warning("store load failed, computing instead: %s", exc)
            return 0
        problems = list(self._verifier.map(self._problem, codes, views, block_hashes))
        valid = next((i for i, p in enumerate(problems) if p is not None), len(problems))
        if valid < len(problems):
            self._reject(keys[valid], str(problems[valid]), codes[valid])
        self._copy_in(block_ids[:valid], slots[:valid])
        return valid

    def _problem(self, code: int, view: memoryview, block_hash: bytes) -> str | None:
        # runs on the verifier threads: crc32 releases the GIL, so blocks check in parallel
        if code != self.layout.record_bytes:
            return f"read failed ({code})"
        return self.layout.check(view, block_hash)

    def _copy_in(self, block_ids: Sequence[int], slots: Sequence[int]) -> None:
        for block_id, slot in zip(block_ids, slots, strict=True):
            for layer, staged in zip(self.layers, self._block_view(slot), strict=True):
                layer[block_id].copy_(staged)

    def _reject(self, key: str, problem: str, code: int) -> None:
        self.stats.rejected_blocks += 1
        log.warning("stored KV block %s not used: %s", key, problem)
        if code >= 0:  # it exists but is wrong: drop it so a good copy can be stored
            asyncio.run_coroutine_threadsafe(self._remove(key), self.io.loop)

    async def _remove(self, key: str) -> None:
        try:
            await self.store.remove(key, force=True)
        except KvcakeError as exc:
            log.debug("could not remove bad block %s: %s", key, exc)

    # -- saving --------------------------------------------------------------------------

    def _stage(self, slot: int, block_id: int, block_hash: bytes) -> memoryview:
        for layer, staged in zip(self.layers, self._block_view(slot), strict=True):
            staged.copy_(layer[block_id])
        record = self._record(slot)
        record[:HEADER_BYTES] = self.layout.pack_header(block_hash, record[HEADER_BYTES:])
        return record

    async def _put(self, keys: list[str], views: list[memoryview], slots: list[int]) -> None:
        try:
            codes = await self.store.batch_put_from(keys, views)
        except KvcakeError as exc:
            log.warning("store save failed: %s", exc)
            codes = [int(exc.code)] * len(keys)
        finally:
            self._give_slots(slots)
        for key, code in zip(keys, codes, strict=True):
            if code == 0:
                self._remember(key)
        ok = sum(1 for c in codes if c == 0)
        self.stats.saved_blocks += ok
        self.stats.failed_blocks += len(codes) - ok

    def _remember(self, key: str) -> None:
        with self._lock:
            self._known[key] = None
            self._known.move_to_end(key)
            while len(self._known) > _KNOWN_KEYS:
                self._known.popitem(last=False)

    # -- staging slots -------------------------------------------------------------------

    def _record(self, slot: int) -> memoryview:
        size = self.layout.record_bytes
        return memoryview(self._buffer)[slot * size:(slot + 1) * size]

    def _payload(self, slot: int) -> torch.Tensor:
        start = slot * self.layout.record_bytes + HEADER_BYTES
        raw = torch.frombuffer(self._buffer, dtype=torch.uint8, offset=start,
                               count=self.layout.payload_bytes)
        return raw.view(self.layers[0].dtype)

    def _block_view(self, slot: int) -> torch.Tensor:
        # (num_layers, *one layer's block)
        return self._payload(slot).view(self._block_shape)

    def _take_slots(self, count: int, wait: bool) -> list[int]:
        while True:
            with self._lock:
                if self._free or not wait:
                    taken = self._free[:count]
                    del self._free[:count]
                    return taken
            self.wait_saves()

    def _give_slots(self, slots: list[int]) -> None:
        with self._lock:
            self._free.extend(slots)

    def _begin(self) -> None:
        with self._lock:
            self._inflight += 1
            self._idle.clear()

    def _end(self) -> None:
        with self._lock:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    def wait_saves(self, timeout: float | None = None) -> bool:
        """Block until every save in flight has finished; ``False`` on timeout."""
        return self._idle.wait(timeout)


    def close(self, timeout_s: float = 30.0) -> None:
        """Wait for saves in flight, then leave the store and stop the transfer engine."""
        self.wait_saves(timeout_s)
        self._verifier.shutdown()
        try:
            self.io.run(self.store.close(), timeout_s)
        finally:
            self.transfer.close()


def connect_store(master: str, segment_size: int, host: str | None = None,
                  tenant: str | None = None) -> tuple[AsyncStore, TransferEngine]:
    """A store client (contributing ``segment_size`` bytes) on its own transfer engine,
    reachable at ``host`` (``None``: ``KVCAKE_TRANSFER_HOST``, else 127.0.0.1), in store
    tenant ``tenant`` (``None``: ``KVCAKE_STORE_TENANT``, else ``default``)."""
    transfer = load_config(TransferConfig, "transfer", {"host": host})
    config = load_config(StoreConfig, "store", {"master": master, "tenant": tenant,
                                                "segment_size": segment_size})
    engine = TransferEngine(transfer)
    store = AsyncStore(config, transfer, engine)
    try:
        engine.io.run(store.setup())
    except BaseException:
        engine.close()
        raise
    return store, engine
