"""Puts whose ``PutEnd`` the writer sends without waiting for its reply.

A put is two master calls: ``PutStart`` before the bytes, ``PutEnd`` after. On a master
without a journal, a writer that asks for it (``PutStart.pipeline_end``: Mooncake's
synchronous API does) may send ``PutEnd`` and return at once, a round trip sooner; the
reply is read before the writer's next call on that connection. What must not change is
that a client the writer then tells of the key finds it. So a read (get, exist, query) or
a removal of a key whose pipelined put has not ended waits for that end:

    writer  PutStart ─► bytes ─► PutEnd (sent, not awaited) ─► put returns ─► tells B
    master                         ┆ its PutEnd may still be on the wire  ┆
    B                                          GetReplicas ─► waits ─► PutEnd handled ─► found

The wait is short: the ``PutEnd`` left the writer before its put returned. It ends early
when the put fails or is revoked (nothing is found then), and at ``limit_s`` at the latest.
A master with a journal answers ``PutEnd`` once the change is durable, so it never allows
this: an acknowledged put there is always a durable one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from kvcake.store.master.replica import StoredObject

_RECHECK_S = 0.05  # a revocation by the sweep wakes no one: look again this often


class PendingEnds:
    """The scoped keys of pipelined puts not ended yet. ``objects``: the master's table;
    ``scope(client_id, keys)``: the keys of a call in its tenant; ``limit_s``: the longest a
    read waits."""

    def __init__(self, objects: Mapping[str, StoredObject],
                 scope: Callable[[str, list[str]], list[str]], limit_s: float) -> None:
        self._objects = objects
        self._scope = scope
        self._limit_s = limit_s
        self._keys: set[str] = set()
        self._ended = asyncio.Event()

    def guard(self, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``handler`` of a keyed read or removal (``request.client_id``, ``request.keys``),
        run at once, or once the pipelined puts of its keys have ended."""
        def handle(request: Any) -> Any:
            if not self._keys:  # the common case: no pipelined put is open
                return handler(request)
            keys = self._scope(request.client_id, request.keys)
            return self._then(keys, handler, request) if self.waiting(keys) \
                else handler(request)
        return handle

    async def _then(self, keys: list[str], handler: Callable[[Any], Any], request: Any) -> Any:
        await self._wait(keys)
        reply = handler(request)
        return await reply if isinstance(reply, Awaitable) else reply

    def started(self, client_id: str, keys: list[str]) -> None:
        """``client_id``'s puts of ``keys`` began, their ends to come pipelined."""
        self._keys.update(self._scope(client_id, keys))

    def ended(self, client_id: str, keys: list[str]) -> None:
        """``client_id``'s puts of ``keys`` ended or were revoked: wake every waiting read
        (there are none while no pipelined put is open)."""
        if not self._keys:
            return
        self._keys.difference_update(self._scope(client_id, keys))
        self._ended.set()
        self._ended = asyncio.Event()

    def open(self, key: str) -> bool:
        """Whether ``key``'s pipelined put is still under way (forgotten once it is not)."""
        if key not in self._keys:
            return False
        obj = self._objects.get(key)
        if obj is not None and not obj.complete:
            return True
        self._keys.discard(key)
        return False

    def waiting(self, keys: Sequence[str]) -> list[int]:
        """The indices of ``keys`` a read must wait for."""
        return [i for i, key in enumerate(keys) if self.open(key)]

    async def _wait(self, keys: Sequence[str]) -> None:
        """Until none of ``keys`` has a pipelined put under way, or ``limit_s`` passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._limit_s
        while self.waiting(keys) and (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), min(left, _RECHECK_S))

    def tidy(self) -> None:
        """Forget the keys whose puts are over (their readers came by, or none did)."""
        for key in list(self._keys):
            self.open(key)
