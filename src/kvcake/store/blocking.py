"""Running a store plan (:mod:`kvcake.store.steps`) in the caller's own thread: master
calls on a blocking socket of that thread's, transfers run from it too (a same-host copy
right there, small ``tcp`` transfers on the thread's own connection to the peer; only
large ones move on the engine's loop, spread over its connections). A synchronous call so
costs one master round trip per ask, not two thread hops more.

What the asyncio session does for its calls still holds: when a call fails in a way the
session recovers from (the master restarted and forgot this client, the leader changed,
its term is in doubt), the call is handed to :meth:`MasterSession.call_after` on the loop,
which rejoins or follows the failover and sends it again only where it may not have run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from kvcake.common import codec
from kvcake.common.blocking_rpc import BlockingRpcClient, PerThread
from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.log import get_logger
from kvcake.store.replica_io import Live
from kvcake.store.steps import (
    Ask,
    Driving,
    Move,
    Plan,
    Receive,
    Send,
    Step,
    Tell,
    logged,
    moved,
    told,
)

log = get_logger(__name__)
T = TypeVar("T")
RECOVERABLE = frozenset({ErrorCode.RPC_FAIL, ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS,
                         ErrorCode.UNAVAILABLE_IN_CURRENT_MODE})


class BlockingDriver:
    """``live()``: the session and engine (raises when the client is not set up)."""

    def __init__(self, live: Live) -> None:
        self._live = live
        self._clients = PerThread(self._new_client)  # each thread's, per master endpoint

    def run(self, plan: Plan[T]) -> T:
        """Run ``plan`` to its end in this thread; its result (or what it raised)."""
        _, engine = self._live()
        assert not engine.io.in_loop_thread(), "a blocking store call on the engine's loop"
        driving = Driving(plan)
        while (step := driving.step) is not None:
            try:
                driving.answer(self._do(step))
            except KvcakeError as exc:
                driving.fail(exc)
        return driving.result

    def _do(self, step: Step) -> Any:
        if isinstance(step, Ask):
            return self._ask(step)
        if isinstance(step, Tell):
            return self._tell(step)
        if isinstance(step, Send):
            return self._send(step)
        if isinstance(step, Receive):
            return step.ticket.take()
        return self._move(step)

    def _tell(self, step: Tell) -> None:
        """Send ``step`` and go on; its reply is read before this thread's next call on
        the connection (a refusal logged). One that could not be sent is asked instead
        (one that is harmless to lose, dropped)."""
        session, _ = self._live()
        client = self._clients.get(session.rpc.endpoint)
        try:
            client.send(codec.encode(step.request), lambda reply: _told(step, reply))
        except KvcakeError as exc:
            if step.harmless:
                log.debug("store: %s not sent: %s", type(step.request).__name__, exc)
                return
            told(step, self._ask(Ask(step.request, step.reply_type)))

    def _ask(self, step: Ask) -> Any:
        return self._send(Send(step.request, step.reply_type)).take()

    def _send(self, step: Send) -> Ticket:
        session, _ = self._live()
        client = self._clients.get(session.rpc.endpoint)  # a failover: another endpoint
        try:
            reply: Callable[[], bytes] | KvcakeError = client.begin(codec.encode(step.request))
        except KvcakeError as exc:
            reply = exc
        return Ticket(self._live, step, session.leader_uid, reply)

    def _move(self, step: Move) -> list[KvcakeError | None]:
        _, engine = self._live()
        errors = engine.transfer_here(step.requests)
        if errors is not None:
            return logged(errors)
        batch = engine.submit(step.requests)
        with contextlib.suppress(KvcakeError):  # per request in batch.errors
            batch.wait()
        return moved(batch)

    def _new_client(self, endpoint: str) -> BlockingRpcClient:
        session, _ = self._live()
        config = session.config
        return BlockingRpcClient(endpoint, config.rpc_timeout_s,
                                 spin_s=config.reply_spin_us / 1e6)

    def close(self) -> None:
        """Close every thread's connections (a later call opens its own again)."""
        self._clients.close()


class Ticket:
    """A master call sent from this thread (or that could not be): :meth:`take` waits for
    its reply and decodes it, recovering as the asyncio session would."""

    def __init__(self, live: Live, step: Send, uid: str,
                 reply: Callable[[], bytes] | KvcakeError) -> None:
        self._live = live
        self._step = step
        self._uid = uid  # the leader it went to
        self._reply = reply  # waits for the reply; or why the request was never sent

    def take(self) -> Any:
        step, reply = self._step, self._reply
        try:
            if isinstance(reply, KvcakeError):
                raise reply
            return codec.decode(reply(), step.reply_type)
        except KvcakeError as exc:
            if exc.code not in RECOVERABLE:
                raise
            session, engine = self._live()
            if exc.code is ErrorCode.RPC_FAIL and isinstance(reply, KvcakeError):
                return engine.io.run(session.call(step.request, step.reply_type))
            return engine.io.run(session.call_after(exc, self._uid, step.request,
                                                    step.reply_type))


def _told(step: Tell, reply: bytes | KvcakeError) -> None:
    if isinstance(reply, KvcakeError):
        log.log(logging.DEBUG if step.harmless else logging.WARNING,
                "store: %s sent without waiting got no reply: %s",
                type(step.request).__name__, reply)
        return
    try:
        told(step, codec.decode(reply, step.reply_type))
    except KvcakeError as exc:
        log.warning("store: %s's late reply is unreadable: %s", type(step.request).__name__,
                    exc)
