"""A sequenced ZMQ feed with replay, as vLLM publishes its KV events: each message is
``(topic, seq, payload)`` with ``seq`` an 8-byte big-endian count from 0; a ROUTER socket
answers ``(b"", start seq)`` with every buffered message from ``start`` on, as
``(b"", topic, seq, payload)``, then an end marker whose ``seq`` is -1.

:class:`EventFeed` hands payloads to its callback in ``seq`` order, none twice, and heals a
gap (a lost message, or messages sent before it joined) from the replay socket: when a
message arrives past the next ``seq``, and whenever the feed has been quiet for a while (a
PUB socket drops what it sends before a subscription has joined, and a lost last message
shows no gap until the next one). It connects to the publisher (vLLM binds wildcard and
``ipc://`` addresses, the ones its sidecar gives it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import zmq
import zmq.asyncio

from kvcake.common.log import get_logger

log = get_logger(__name__)
END_SEQ = -1
_REPLAY_TIMEOUT_S = 10.0
_QUIET_S = 2.0  # no message this long: ask the replay socket for anything missed


class EventFeed:
    """Reads vLLM's KV events into ``apply`` in ``seq`` order, none twice, none lost while
    the replay buffer still holds them. ``num_replays``: replays that brought messages."""

    def __init__(self, endpoint: str, replay_endpoint: str,
                 apply: Callable[[bytes], None], quiet_s: float = _QUIET_S) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.apply = apply
        self.quiet_s = quiet_s
        self.last_seq: int | None = None
        self.num_replays = 0
        self._ctx = zmq.asyncio.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.connect(endpoint)

    async def run(self) -> None:
        try:
            while True:
                if not await self._sub.poll(self.quiet_s * 1000):
                    if self.replay_endpoint:  # quiet: anything sent and missed meanwhile
                        await self.replay(self._expected(), quiet=True)
                    continue
                _, seq_bytes, payload = await self._sub.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if seq > self._expected():
                    await self.replay(self._expected())
                self._take(seq, payload)
        finally:
            self._sub.close(linger=0)
            self._ctx.term()

    def _expected(self) -> int:
        return 0 if self.last_seq is None else self.last_seq + 1

    def _take(self, seq: int, payload: bytes) -> bool:
        if self.last_seq is not None and seq <= self.last_seq:
            return False  # replayed already
        self.apply(payload)
        self.last_seq = seq
        return True

    async def replay(self, start: int, quiet: bool = False) -> None:
        """Batches ``start..`` from vLLM's replay buffer, until its end marker. ``quiet``:
        a check while nothing arrives, logged only when it finds something."""
        say = log.debug if quiet else log.info
        say("KV events: asking %s to replay from %d", self.replay_endpoint, start)
        brought = False
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.replay_endpoint)
        try:
            if not self.replay_endpoint:
                raise TimeoutError  # nobody to ask
            await dealer.send_multipart((b"", start.to_bytes(8, "big")))
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), _REPLAY_TIMEOUT_S)
                seq = int.from_bytes(frames[-2], "big", signed=True)
                if seq == END_SEQ:
                    break
                brought = self._take(seq, frames[-1]) or brought
        except TimeoutError:
            (log.debug if quiet else log.warning)(
                "KV events: no replay from %s within %gs; the index may lack blocks",
                self.replay_endpoint, _REPLAY_TIMEOUT_S)
        finally:
            dealer.close(linger=0)
        if brought:
            self.num_replays += 1
            if quiet:
                log.info("KV events: %s had sent up to %s unseen (the feed was quiet)",
                         self.endpoint, self.last_seq)
