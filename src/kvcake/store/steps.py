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

import contextlib
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

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
class Move:
    """One batch of transfers; the plan is sent each request's error (``None``: moved)."""

    requests: list[TransferRequest]


Step = Ask | Move
Plan = Generator[Step, Any, T]


def submitted(engine: TransferEngine, move: Move) -> Batch:
    return engine.submit(move.requests)


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


async def drive(plan: Plan[T], session: MasterSession, engine: TransferEngine) -> T:
    """Run ``plan`` on the running loop: master calls through ``session`` (which rejoins
    and follows failovers), transfers through ``engine``."""
    outcome: Any = None
    failure: KvcakeError | None = None
    while True:
        try:
            step = plan.throw(failure) if failure is not None else plan.send(outcome)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        failure = None
        try:
            if isinstance(step, Ask):
                outcome = await session.call(step.request, step.reply_type)
            else:
                outcome = engine.copy(step.requests)  # same-host bytes: right here
                if outcome is not None:
                    outcome = logged(outcome)
                else:
                    batch = submitted(engine, step)
                    with contextlib.suppress(KvcakeError):  # per request in batch.errors
                        await batch
                    outcome = moved(batch)
        except KvcakeError as exc:
            failure = exc
