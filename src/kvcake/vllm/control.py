"""The scheduler side's control server (:mod:`kvcake.wire.vllm`): it answers the sidecar
with the blocks vLLM allocated for a decode request, and takes a prefill's word that it
wrote them. vLLM's scheduler thread and the server's loop share one :class:`PdPlan` under a
lock; a waiting ``AwaitBlocks`` is woken from the scheduler thread. Torch-free."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from kvcake.common.aio import LoopThread
from kvcake.common.log import get_logger
from kvcake.common.rpc import Dispatcher, RpcServer
from kvcake.transfer.grants import GrantMode, sign_grant
from kvcake.vllm.pd import Arrival, PdPlan
from kvcake.wire.kv import KVRegion
from kvcake.wire.vllm import (
    AwaitBlocks,
    Blocks,
    ControlRequest,
    Describe,
    Described,
    Forget,
    KvArrived,
)
from kvcake.wire.worker import Ack

log = get_logger(__name__)
SWITCH_INTERVAL_S = 0.0005
# an abandoned decode request's blocks are freed once its prefill says it stopped writing, or
# after this: long enough for an aborted prefill's in-flight writes to land
ABANDON_GRACE_S = 5.0


class ControlServer:
    """One per vLLM instance with P/D, on the connector's I/O loop."""

    def __init__(self, io: LoopThread, plan: PdPlan, fingerprint: str, num_blocks: int) -> None:
        self.io = io
        self.plan = plan
        self.fingerprint = fingerprint
        self.num_blocks = num_blocks
        self.region: KVRegion | None = None
        self.grant_key = b""
        self.endpoint = ""
        self._lock = threading.Lock()
        self._news = threading.Event()  # a prefill's word came
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._rpc: RpcServer | None = None
        self.counts = {"received": 0, "received_blocks": 0, "failed": 0, "pd_sent": 0,
                       "pd_sent_by_layer": 0, "pd_sent_bytes": 0, "pd_writing_us": 0}

    def start(self, bind: str, endpoint_file: str) -> str:
        """Serve on ``bind``. The server's loop thread shares the process (and its GIL)
        with vLLM's engine, which holds the GIL for most of a step: at Python's default
        switch interval (5 ms per hand-over) one answer took up to seconds under load, so
        the process switches every ``SWITCH_INTERVAL_S``."""
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        host, _, port = bind.rpartition(":")
        dispatcher = Dispatcher(ControlRequest, {
            Describe: self._describe, AwaitBlocks: self._await_blocks,
            KvArrived: self._arrived, Forget: self._forget})
        self._rpc = RpcServer(dispatcher, host, int(port))
        self.endpoint = self.io.run(self._rpc.startup(), 10.0)
        if endpoint_file:
            Path(endpoint_file).write_text(self.endpoint)
        log.info("prefill/decode control on %s", self.endpoint)
        return self.endpoint

    def stop(self) -> None:
        if self._rpc is not None:
            self.io.run(self._rpc.shutdown(), 10.0)

    # -- from vLLM's scheduler thread --------------------------------------------------

    def wait(self, request_id: str, key: str) -> None:
        with self._lock:
            self.plan.wait(request_id, key, time.monotonic(), ABANDON_GRACE_S)

    def allocated(self, request_id: str, block_ids: Sequence[int],
                  num_computed_tokens: int) -> None:
        with self._lock:
            allocated = self.plan.allocated(request_id, block_ids, num_computed_tokens)
        if allocated is not None:
            self.io.call(self._wake, allocated[0])

    def idle(self, timeout_s: float) -> None:
        """vLLM has nothing to compute but decode requests waiting for their KV: rather than
        step again at once (its loop would spin a core that prefill instances on this host
        need), wait until a prefill's word comes or ``timeout_s`` passes."""
        with self._lock:
            waiting = self.plan.num_waiting()
        if waiting and self._news.wait(timeout_s):
            self._news.clear()

    def take_arrivals(self) -> list[Arrival]:
        with self._lock:
            arrivals = self.plan.take_arrivals(time.monotonic())
        for arrival in arrivals:
            if arrival.ended:
                continue
            if arrival.ok:
                self.counts["received"] += 1
                self.counts["received_blocks"] += len(arrival.block_ids)
            else:
                self.counts["failed"] += 1
                log.warning("prefill of vLLM request %s gave up on its KV: computing it here",
                            arrival.request_id)
        return arrivals

    def count(self, more: dict[str, int]) -> None:
        """Add the worker side's P/D write counts (requests, bytes, microseconds in flight)."""
        for name, count in more.items():
            self.counts[name] = self.counts.get(name, 0) + count

    def pending(self) -> bool:
        """Whether some decode request waits for a prefill's word (vLLM must keep stepping
        to hear it, and to free an abandoned request's blocks)."""
        with self._lock:
            return self.plan.num_waiting() > 0

    def finished(self, request_id: str) -> None:
        with self._lock:
            self.plan.finished(request_id, time.monotonic(), ABANDON_GRACE_S)

    # -- from the control channel ------------------------------------------------------

    def _describe(self, _: Describe) -> Described:
        """The region names this server: prefill instances tell it of their writes here."""
        region = self.region
        if region is not None:
            region = msgspec.structs.replace(region, control=self.endpoint)
        return Described(region, self.fingerprint, self.plan.block_size, self.num_blocks,
                         dict(self.counts))

    async def _await_blocks(self, message: AwaitBlocks) -> Blocks:
        deadline = time.monotonic() + message.timeout_s
        while True:
            with self._lock:
                block_ids = self.plan.blocks_of(message.key)
            if block_ids is not None:
                return Blocks(list(block_ids), self._grants(block_ids, message.grant_ttl_s))
            left = deadline - time.monotonic()
            if left <= 0:
                return Blocks(None)
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(message.key, []).append(waiter)
            try:
                await asyncio.wait_for(waiter, left)
            except TimeoutError:
                pass
            finally:
                waiters = self._waiters.get(message.key, [])
                if waiter in waiters:
                    waiters.remove(waiter)

    def _wake(self, key: str) -> None:
        for waiter in self._waiters.pop(key, []):
            if not waiter.done():
                waiter.set_result(None)

    def _grants(self, block_ids: Sequence[int], ttl_s: float) -> list[bytes]:
        region = self.region
        if not self.grant_key or region is None:
            return []
        expires_s = time.time() + ttl_s
        return [sign_grant(self.grant_key, region.descriptor.name, offset, length,
                           GrantMode.WRITE, expires_s, stride, repeat)
                for offset, length, stride, repeat in region.grant_shapes(block_ids)]

    def _arrived(self, message: KvArrived) -> Ack:
        with self._lock:
            known = self.plan.arrived(message.key, message.ok)
        self._news.set()
        log.debug("prefill of %s %s (%s)", message.key, "landed" if message.ok else "failed",
                  "waited for" if known else "no request waits for it")
        return Ack(known)

    def _forget(self, message: Forget) -> Ack:
        with self._lock:
            self.plan.forget(message.key, time.monotonic(), ABANDON_GRACE_S)
        return Ack()
