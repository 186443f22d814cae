"""What the shared KV store holds, as routing needs it: the leading run of a prompt's blocks.

The Conductor is a pure client of the store (it contributes no memory). A store that is
down or slow counts as empty: routing falls back to the instances' own caches and the
prefill instance still finds whatever the store has when it loads.
"""

from __future__ import annotations

import time

from kvcake.common.errors import KvcakeError
from kvcake.common.log import get_logger
from kvcake.store.client import AsyncStore
from kvcake.store.config import StoreConfig
from kvcake.wire.kv import store_keys

log = get_logger(__name__)
_WARN_EVERY_S = 30.0


class StoreView:
    def __init__(self, master: str) -> None:
        self.master = master
        self._store: AsyncStore | None = None
        self._warned_s = -_WARN_EVERY_S

    async def startup(self) -> None:
        if not self.master:
            return
        store = AsyncStore(StoreConfig(master=self.master, segment_size=0))
        try:
            await store.setup()
        except KvcakeError as exc:
            log.warning("store master %s unreachable (%s): routing without it", self.master,
                        exc)
            return
        self._store = store

    async def shutdown(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def hit_blocks(self, namespace: str, block_hashes: tuple[bytes, ...]) -> int:
        """How many leading blocks of the prompt the store holds (0 without a store)."""
        if self._store is None or not block_hashes:
            return 0
        try:
            codes = await self._store.batch_is_exist(store_keys(namespace, block_hashes))
        except KvcakeError as exc:
            self._warn(exc)
            return 0
        return next((i for i, code in enumerate(codes) if code != 1), len(codes))

    def _warn(self, exc: KvcakeError) -> None:
        now = time.monotonic()
        if now - self._warned_s >= _WARN_EVERY_S:
            self._warned_s = now
            log.warning("store lookup failed (%s): routing on instance caches only", exc)
