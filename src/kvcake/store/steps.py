"""A store call as a *plan*: a generator that yields what it needs done (a master call, a
batch of transfers) and is sent back the outcome, so one piece of logic runs under two
drivers: the asyncio client's (:func:`drive`, on the engine's loop) and the blocking one's
(:mod:`kvcake.store.blocking`, in the caller's own thread, no hop to the loop)::

    def exists(keys):                      # a plan
        reply = yield Ask(m.Exist(keys, client_id), m.CodesReply)
        return reply.codes

A failed step is thrown into the plan at its ``yield`` (a ``KvcakeError``), so a plan handles
failures with ordinary ``try``/``except``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from kvcake.common.errors import KvcakeError
from kvcake.common.log import get_logger
from kvcake.store.session import MasterSession
from kvcake.transfer import Batch, TransferEngine, TransferRequest

log = get_logger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Ask:
    """One call to the master; the plan is sent the decoded reply."""

    request: msgspec.Struct
    reply_type: type[Any]


@dataclass(frozen=True)
class Tell:
    """One call to the master whose reply the plan does not wait for; the plan is sent
    ``None``. The blocking driver sends it and reads the reply before its next call on
    that connection, logging a refusal; the asyncio driver waits for it. One that is
    ``harmless`` to lose never fails the plan: its failures are logged at debug level."""

    request: msgspec.Struct
    reply_type: type[Any]
    harmless: bool = False


@dataclass(frozen=True)
class Send:
    """One call to the master whose reply the plan takes later, with :class:`Receive`; the
    plan is sent a ticket for it and may run other steps (a transfer) meanwhile."""

    request: msgspec.Struct
    reply_type: type[Any]


@dataclass(frozen=True)
class Receive:
    """The reply to a :class:`Send` (``ticket``: what that step was answered with, whatever
    the driver made of it); the plan is sent the decoded reply, or its failure is thrown
    in as an :class:`Ask`'s."""

    ticket: Any


@dataclass(frozen=True)
class Move:
    """One batch of transfers; the plan is sent each request's error (``None``: moved)."""

    requests: list[TransferRequest]


Step = Ask | Tell | Send | Receive | Move
Plan = Generator[Step, Any, T]


def told(step: Tell, reply: Any) -> None:
    """Log what the master refused of a :class:`Tell` (its per-key codes)."""
    codes = getattr(reply, "codes", None)
    if codes and any(codes):
        keys = getattr(step.request, "keys", [])
        refused = [(k, c) for k, c in zip(keys, codes, strict=False) if c]
        log.warning("store: the master refused %s of %d keys (after the call returned): %s",
                    type(step.request).__name__, len(codes), refused[:8])


def moved(batch: Batch) -> list[KvcakeError | None]:
    """Each request's error, once ``batch`` is done."""
    return logged(list(batch.errors))


def logged(errors: list[KvcakeError | None]) -> list[KvcakeError | None]:
    """``errors``, its failures logged (once per move)."""
    failures = [e for e in errors if e is not None]
    if failures:
        log.warning("store transfer: %d/%d failed; first: %s", len(failures), len(errors),
                    failures[0])
    return errors


class Driving(Generic[T]):
    """A plan under way, for a driver's loop::

        driving = Driving(plan)
        while (step := driving.step) is not None:
            try:
                driving.answer(do(step))
            except KvcakeError as exc:
                driving.fail(exc)
        return driving.result
    """

    def __init__(self, plan: Plan[T]) -> None:
        self._plan = plan
        self.step: Step | None = None
        self.result: T
        self._advance(lambda: plan.send(None))

    def answer(self, outcome: Any) -> None:
        """``step`` gave ``outcome``: on to the next."""
        self._advance(lambda: self._plan.send(outcome))

    def fail(self, error: KvcakeError) -> None:
        """``step`` failed: ``error`` raises in the plan, which may handle it."""
        self._advance(lambda: self._plan.throw(error))

    def _advance(self, resume: Callable[[], Step]) -> None:
        try:
            self.step = resume()
        except StopIteration as stop:
            self.step, self.result = None, stop.value


async def drive(plan: Plan[T], session: MasterSession, engine: TransferEngine) -> T:
    """Run ``plan`` on the running loop: master calls through ``session`` (which rejoins
    and follows failovers), transfers through ``engine``."""
    driving = Driving(plan)
    while (step := driving.step) is not None:
        try:
            driving.answer(await _done(step, session, engine))
        except KvcakeError as exc:
            driving.fail(exc)
    return driving.result


async def _done(step: Step, session: MasterSession, engine: TransferEngine) -> Any:
    if isinstance(step, Ask):
        return await session.call(step.request, step.reply_type)
    if isinstance(step, Send):
        task = asyncio.ensure_future(session.call(step.request, step.reply_type))
        task.add_done_callback(_retrieved)  # a plan that failed first never receives it
        return task
    if isinstance(step, Receive):
        return await step.ticket
    if isinstance(step, Tell):
        try:
            told(step, await session.call(step.request, step.reply_type))
        except KvcakeError as exc:
            if not step.harmless:
                raise
            log.debug("store: %s not delivered: %s", type(step.request).__name__, exc)
        return None
    errors = engine.copy(step.requests)  # same-host bytes: right here
    if errors is not None:
        return logged(errors)
    batch = engine.submit(step.requests)
    with contextlib.suppress(KvcakeError):  # per request in batch.errors
        await batch
    return moved(batch)


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Take a sent call's outcome, so that one no plan received is not reported unread."""
    if not task.cancelled():
        task.exception()
