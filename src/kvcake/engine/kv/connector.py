"""The store connector: KV blocks of the paged cache to and from the kvcake store.

Keys are ``<model fingerprint>/<tenant>/<block hash hex>``; values follow
:mod:`kvcake.engine.kv.format`. The engine thread only copies: blocks are staged into a
pre-touched ring of record slots and the store traffic (headers and checksums too) runs on
the transfer engine's own event loop, so saving never stalls a step. When every slot is busy
(a slow store), a save is dropped (and counted), never waited for. A load finishes within
the step that admits its request: :meth:`StoreConnector.load` before that step computes the
rest of the prompt; :meth:`StoreConnector.start_load` as the step begins, copying layer by
layer on a helper thread so that the forward pass waits only for the layer it is at (vLLM
calls ``wait_for_layer_load`` as each attention layer starts). Either way each record goes
straight into the cache's block slices (one copy, no staging), checked on the way; a block
that fails is left for the caller to recompute::

    store record   [header | layer 0 | layer 1 | ... | layer L-1]
                       |        |         |                |
    load           header    layers[0][b] layers[1][b] ... layers[L-1][b]   (paged cache)
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kvcake.common.config import load_config
from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.log import get_logger
from kvcake.engine.kv.blocks import BlockBytes, LayeredCopy
from kvcake.engine.kv.format import (
    HEADER_BYTES,
    BlockLayout,
    checksum,
    payload_digest,
    stored_checksum,
)
from kvcake.store.client import AsyncStore, InPlaceValues
from kvcake.store.config import StoreConfig
from kvcake.transfer import MappedRange, TransferEngine
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.segment import private_buffer
from kvcake.wire.kv import store_key, store_keys

log = get_logger(__name__)

_MISMATCH = "payload checksum mismatch"
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


@dataclass
class PendingLoad:
    """A load :meth:`StoreConnector.start_load` began: ``copy`` lands its records layer by
    layer (``None``: the load ended at once, ``valid`` says how many blocks it gave);
    ``problems`` the records' header checks, in key order."""

    keys: list[str]
    codes: list[int]
    problems: list[str | None]
    copy: LayeredCopy | None = None
    fresh: Callable[[], bool] = lambda: True
    valid: int = 0

    def wait(self, layer: int) -> None:
        """Until layer ``layer`` of every block is in place."""
        if self.copy is not None:
            self.copy.wait(layer)


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
        self._blocks = BlockBytes(layers)
        self._buffer = private_buffer(staging_blocks * layout.record_bytes)  # save slots
        self._free = list(range(staging_blocks))
        self._verifier = ThreadPoolExecutor(2, thread_name_prefix="kv-verify")
        self._layer_copier = ThreadPoolExecutor(1, thread_name_prefix="kv-layers")
        self._lock = threading.Lock()
        self._inflight = 0
        self._idle = threading.Event()
        self._idle.set()
        self._known: OrderedDict[str, None] = OrderedDict()
        self.stats = ConnectorStats()
        self.io.run(store.attach_segments())  # no first load waits for a handover

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
        self.forget(key for key, code in zip(keys, codes, strict=True) if code == 0)
        return matched

    def load(self, prefix: str, block_ids: list[int], block_hashes: list[bytes]) -> int:
        """Read stored blocks into ``block_ids``; the count of leading blocks that are valid
        (the bytes of the blocks after them are undefined: the caller recomputes them)."""
        keys = store_keys(prefix, block_hashes)
        try:
            found = self.io.run(self.store.batch_get_in_place(keys))
            if any(mapped is None and code == 0
                   for code, mapped in zip(found.codes, found.ranges, strict=True)):
                codes, problems = self._read_copied(keys, block_ids, block_hashes)
            else:
                codes, problems = self._read_in_place(found, block_ids, block_hashes)
        except KvcakeError as exc:
            log.warning("store load failed, computing instead: %s", exc)
            return 0
        return self._conclude(keys, codes, problems)

    def start_load(self, prefix: str, block_ids: list[int],
                   block_hashes: list[bytes]) -> PendingLoad:
        """:meth:`load` begun: where every replica lies on this host, the records are copied
        in layer by layer on a helper thread (``wait`` on the result for a layer); else the
        load happens now. :meth:`finish_load` gives the count of valid leading blocks."""
        keys = store_keys(prefix, block_hashes)
        try:
            found = self.io.run(self.store.batch_get_in_place(keys))
        except KvcakeError as exc:
            log.warning("store load failed, computing instead: %s", exc)
            return PendingLoad(keys, [], [])
        if any(mapped is None and code == 0
               for code, mapped in zip(found.codes, found.ranges, strict=True)):
            valid = self.load(prefix, block_ids, block_hashes)  # replicas elsewhere
            return PendingLoad(keys, [], [], valid=valid)
        problems = [self._check_header(code, mapped, block_hash) for code, mapped, block_hash
                    in zip(found.codes, found.ranges, block_hashes, strict=True)]
        sound = next((i for i, p in enumerate(problems) if p is not None), len(problems))
        records = [mapped.view for mapped in found.ranges[:sound] if mapped is not None]
        copy = LayeredCopy(self._blocks, block_ids[:sound],
                           [record[HEADER_BYTES:] for record in records],
                           [stored_checksum(record) for record in records])
        try:
            self._layer_copier.submit(copy.run)
        except RuntimeError:  # closed: copy here, rather than leave a waiter hanging
            copy.run()
        return PendingLoad(keys, found.codes, problems, copy, found.fresh)

    def finish_load(self, pending: PendingLoad) -> int:
        """Wait for a :meth:`start_load` to land; the count of leading blocks that are
        valid (as :meth:`load`'s)."""
        if pending.copy is None:
            return pending.valid
        problems = list(pending.problems)
        for i, whole in enumerate(pending.copy.result()):  # the records before a bad header
            problems[i] = None if whole else _MISMATCH
        if not pending.fresh():  # freed and maybe reused while we read: nothing counts
            return self._conclude(pending.keys, [ErrorCode.LEASE_EXPIRED] * len(problems),
                                  [p or "its lease ran out while it was read"
                                   for p in problems])
        return self._conclude(pending.keys, pending.codes, problems)

    def _conclude(self, keys: list[str], codes: list[int],
                  problems: list[str | None]) -> int:
        """The count of leading valid blocks; the first bad one is dropped from the store."""
        valid = next((i for i, p in enumerate(problems) if p is not None), len(problems))
        if valid < len(problems):
            self._reject(keys[valid], str(problems[valid]), codes[valid])
        self.stats.loaded_blocks += valid
        return valid

    def save(self, prefix: str, block_ids: list[int], block_hashes: list[bytes]) -> None:
        with self._lock:
            todo = [(b, h, key) for b, h in zip(block_ids, block_hashes, strict=True)
                    if (key := store_key(prefix, h)) not in self._known]
        slots = self._take_slots(len(todo))
        self.stats.dropped_blocks += len(todo) - len(slots)
        if not slots:
            return
        todo = todo[:len(slots)]
        keys = [key for _, _, key in todo]
        hashes = [block_hash for _, block_hash, _ in todo]
        for slot, (block_id, _, _) in zip(slots, todo, strict=True):
            self._stage(slot, block_id)
        self._begin()
        future = asyncio.run_coroutine_threadsafe(self._put(keys, hashes, slots),
                                                  self.io.loop)
        future.add_done_callback(lambda _: self._end())

    # -- loading -------------------------------------------------------------------------

    def _read_in_place(self, found: InPlaceValues, block_ids: Sequence[int],
                       block_hashes: Sequence[bytes]) -> tuple[list[int], list[str | None]]:
        """Every replica on this host, blocks side by side on the verifier threads: each
        record copied into the block's slices and hashed run by run; or, for small runs,
        checked where it lies and then copied by this thread in one strided copy a block."""
        here = self._blocks.small_runs
        check = self._check_in_place if here else self._copy_checked
        problems = list(self._verifier.map(check, found.codes, found.ranges, block_ids,
                                           block_hashes))
        for block_id, mapped, problem in zip(block_ids, found.ranges, problems, strict=True):
            if not here or problem is not None or mapped is None:
                break
            self._blocks.copy_in(block_id, mapped.view[HEADER_BYTES:])
        if not found.fresh():  # freed and maybe reused while we read: nothing counts
            return ([ErrorCode.LEASE_EXPIRED] * len(problems),
                    [problem or "its lease ran out while it was read" for problem in problems])
        return found.codes, problems

    def _copy_checked(self, code: int, mapped: MappedRange | None, block_id: int,
                      block_hash: bytes) -> str | None:
        """A record's header checked, then its payload copied into the block and hashed
        run by run (a bad payload's bytes are left there, undefined)."""
        problem = self._check_header(code, mapped, block_hash)
        if problem is not None or mapped is None:
            return problem
        digest = payload_digest()
        self._blocks.memmove_in(block_id, mapped.view[HEADER_BYTES:], digest)
        return None if digest.intdigest() == stored_checksum(mapped.view) else _MISMATCH

    def _check_in_place(self, code: int, mapped: MappedRange | None, block_id: int,
                        block_hash: bytes) -> str | None:
        # runs on the verifier threads: the checksum releases the GIL
        problem = self._check_header(code, mapped, block_hash)
        if problem is not None or mapped is None:
            return problem
        if checksum([mapped.view[HEADER_BYTES:]]) != stored_checksum(mapped.view):
            return _MISMATCH  # checked where it lies: one call a block
        return None

    def _check_header(self, code: int, mapped: MappedRange | None,
                      block_hash: bytes) -> str | None:
        if code != 0 or mapped is None:
            return f"read failed ({code})"
        record = mapped.view
        if record.nbytes != self.layout.record_bytes:
            return f"size {record.nbytes}, expected {self.layout.record_bytes}"
        return self.layout.check_header(record[:HEADER_BYTES], block_hash)

    def _read_copied(self, keys: list[str], block_ids: Sequence[int],
                     block_hashes: Sequence[bytes]) -> tuple[list[int], list[str | None]]:
        """Replicas elsewhere: each record straight into the block's slices, then checked."""
        headers = memoryview(bytearray(HEADER_BYTES * len(keys)))
        heads = [headers[i * HEADER_BYTES:(i + 1) * HEADER_BYTES] for i in range(len(keys))]
        payloads = [self._blocks.views(block_id) for block_id in block_ids]
        parts = [[head, *payload] for head, payload in zip(heads, payloads, strict=True)]
        codes = self.io.run(self.store.batch_get_into_parts(keys, parts))
        return codes, list(self._verifier.map(self._problem, codes, heads, payloads,
                                              block_hashes))

    def _problem(self, code: int, header: memoryview, payload: list[memoryview],
                 block_hash: bytes) -> str | None:
        # runs on the verifier threads: the checksum releases the GIL
        if code != self.layout.record_bytes:
            return f"read failed ({code})"
        return self.layout.check_parts(header, payload, block_hash)

    def _reject(self, key: str, problem: str, code: int) -> None:
        self.stats.rejected_blocks += 1
        log.warning("stored KV block %s not used: %s", key, problem)
        if code >= 0:  # it exists but is wrong: drop it so a good copy can be stored
            with self._lock:  # (by this instance too, though it stored one before)
                self._known.pop(key, None)
            asyncio.run_coroutine_threadsafe(self._remove(key), self.io.loop)

    async def _remove(self, key: str) -> None:
        try:
            await self.store.remove(key, force=True)
        except KvcakeError as exc:
            log.debug("could not remove bad block %s: %s", key, exc)

    # -- saving --------------------------------------------------------------------------

    def _stage(self, slot: int, block_id: int) -> None:
        self._blocks.copy_out(block_id, self._record(slot)[HEADER_BYTES:])

    async def _put(self, keys: list[str], hashes: list[bytes], slots: list[int]) -> None:
        records = [self._record(slot) for slot in slots]
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._verifier, self._seal, records, hashes)
            codes = await self.store.batch_put_from(keys, records)
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

    def _seal(self, records: list[memoryview], hashes: list[bytes]) -> None:
        """Write each staged record's header (its checksum: off the engine thread)."""
        for record, block_hash in zip(records, hashes, strict=True):
            record[:HEADER_BYTES] = self.layout.pack_header(block_hash,
                                                            [record[HEADER_BYTES:]])

    def forget(self, keys: Iterable[str]) -> None:
        """Keys the store no longer holds (evicted, removed) are saved again when their
        blocks are computed again."""
        with self._lock:
            for key in keys:
                self._known.pop(key, None)

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

    def _take_slots(self, count: int) -> list[int]:
        """Up to ``count`` free slots (fewer, or none, while saves hold them)."""
        with self._lock:
            taken = self._free[:count]
            del self._free[:count]
            return taken

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
        self._layer_copier.shutdown()
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
