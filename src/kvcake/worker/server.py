"""An instance's asyncio side: its RPC server, registration and reports to the Conductor.

``startup`` loads the model, profiles it, starts the engine thread and serves; it registers
with the Conductor and keeps reporting every ``report_s``. A reply saying the Conductor does
not know this instance (it restarted) makes it register again, with a snapshot of every
block it caches, so the Conductor's index is rebuilt from the instances.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TypeVar

from kvcake.common.aio import TaskSet
from kvcake.common.codec import decode, encode
from kvcake.common.config import load_config
from kvcake.common.errors import InvalidParamsError, KvcakeError, unreachable
from kvcake.common.lifespan import PHASE_TIMEOUT_S, StartupTurns, bounded
from kvcake.common.log import get_logger
from kvcake.common.rpc import Dispatcher, RpcClient, RpcServer
from kvcake.engine.config import EngineConfig
from kvcake.engine.core import EngineCore, EngineLoad
from kvcake.engine.kv import KVSender, sign_kv_grants
from kvcake.transfer import TransferEngine
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.segment import instance_registrant
from kvcake.wire.conductor import (
    MAX_BLOCK_HASHES,
    MAX_EVENTS,
    MAX_SAMPLES,
    InstanceLoad,
    KVEvent,
    Outbox,
    Outputs,
    PrefillDone,
    Register,
    Report,
    ReportReply,
    Role,
    Snapshot,
)
from kvcake.wire.output import TokenOutput
from kvcake.wire.worker import (
    Abort,
    Ack,
    Commit,
    Prefill,
    Release,
    Reserve,
    Reserved,
    WorkerRequest,
)
from kvcake.worker.config import WorkerConfig
from kvcake.worker.loop import EngineLoop, Telemetry
from kvcake.worker.profile import profile_engine

log = get_logger(__name__)
T = TypeVar("T")
_RPC_TIMEOUT_S = 10.0


class WorkerServer:
    """``await startup()`` → serve → ``await shutdown()``."""

    def __init__(self, config: WorkerConfig, engine_config: EngineConfig) -> None:
        self.config = config
        self.engine_config = engine_config
        self.instance_id = config.instance_id or f"{config.role}-{os.getpid()}"
        self.endpoint = ""
        self._transfer: TransferEngine | None = None
        self._core: EngineCore | None = None
        self._loop: EngineLoop | None = None
        self._rpc: RpcServer | None = None
        self._conductor = RpcClient(config.conductor, _RPC_TIMEOUT_S)
        self._outbox = Outbox(self._conductor)
        self._tasks = TaskSet()
        self._seq = 0
        self._registered = False
        self._ever_registered = False
        self._need_snapshot = False
        self._profile: Telemetry = Telemetry()
        self._turns = StartupTurns(config.profile_lock)  # siblings profile once all loaded
        self.engine_error: BaseException | None = None  # what ended the engine thread
        self._stop_on_death: Callable[[], None] = lambda: None

    @property
    def core(self) -> EngineCore:
        assert self._core is not None, "not started"
        return self._core

    async def startup(self) -> str:
        await asyncio.to_thread(self._build_engine, asyncio.get_running_loop())
        self._rpc = RpcServer(self._dispatcher(), self.config.host, self.config.port)
        self.endpoint = await self._rpc.startup()
        assert self._loop is not None
        self._loop.start()
        self._tasks.spawn(self._report_forever(), "report")
        self._tasks.spawn(self._outbox.send_forever(), "outbox")
        return self.endpoint

    def _build_engine(self, loop: asyncio.AbstractEventLoop) -> None:
        # peers (decode instances, the store's nodes) reach this instance's memory here
        self._transfer = TransferEngine(load_config(TransferConfig, "transfer",
                                                    {"host": self.config.host}))
        self._core = core = EngineCore(self.engine_config, transfer=self._transfer)
        if core.kv_segment is not None:  # the Conductor publishes it as ours, and only so
            self._transfer.bind(core.kv_segment.name, instance_registrant(self.instance_id))
        if self.config.profile:
            with self._turns.turn():
                self._profile = profile_engine(core)
        else:
            self._turns.close()  # no turn wanted: the siblings' may go
        sender = None
        if self.config.role == Role.PREFILL:
            assert core.kv_region is not None and core.kv_segment is not None
            sender = KVSender(self._transfer, core.kv_region, core.kv_segment.view)
        self._loop = EngineLoop(core, sender, self._threadsafe(loop, self._queue_outputs),
                                self._threadsafe(loop, self._queue_prefill_done),
                                self.config.reserve_timeout_s, self.config.transfer_timeout_s,
                                self.config.send_by_layer,
                                self._threadsafe(loop, self._engine_died))

    def on_engine_death(self, stop: Callable[[], None]) -> None:
        """Call ``stop`` (on the server's loop) if the engine thread dies: the instance
        stops then, rather than take requests nothing runs, and the Conductor drops it once
        its reports stop."""
        self._stop_on_death = stop

    def _engine_died(self, error: BaseException) -> None:
        self.engine_error = error
        log.error("instance %s: its engine thread died (%r); it stops", self.instance_id,
                  error)
        self._stop_on_death()

    @staticmethod
    def _threadsafe(loop: asyncio.AbstractEventLoop,
                    fn: Callable[..., None]) -> Callable[..., None]:
        """``fn`` called on ``loop`` whichever thread calls the result."""
        def call(*args: object) -> None:
            loop.call_soon_threadsafe(fn, *args)
        return call

    async def shutdown(self) -> None:
        """Stop in order: background tasks, the RPC server, the engine thread, the engine,
        the transfer engine. Each phase gets ``PHASE_TIMEOUT_S``; one that overruns is
        logged and left behind, so shutting down never hangs."""
        await self._tasks.cancel(PHASE_TIMEOUT_S)
        if self._rpc is not None:
            await self._rpc.shutdown()
        self._conductor.close()
        if self._loop is not None:
            await bounded(asyncio.to_thread(self._loop.stop), "the engine thread")
        if self._core is not None:
            await bounded(asyncio.to_thread(self._core.close), "the engine")
        if self._transfer is not None:
            await bounded(asyncio.to_thread(self._transfer.close), "the transfer engine")

    # -- requests from the Conductor --------------------------------------------------

    def _dispatcher(self) -> Dispatcher:
        return Dispatcher(WorkerRequest, {
            Prefill: self._prefill, Reserve: self._reserve, Commit: self._commit,
            Release: self._release, Abort: self._abort,
        })

    async def _on_loop(self, work: Callable[[EngineLoop], T]) -> T:
        """``work(loop)`` run on the engine thread; its result."""
        assert self._loop is not None
        loop = self._loop
        return await asyncio.wrap_future(loop.call(lambda: work(loop)))

    async def _prefill(self, message: Prefill) -> Ack:
        self._check_role(message)
        await self._on_loop(lambda loop: loop.add(message))
        return Ack()

    async def _reserve(self, message: Reserve) -> Reserved:
        """Blocks for the prompt; its leading blocks this cache holds are not written (nor
        granted): the prefill instance writes the rest."""
        def reserve(loop: EngineLoop) -> tuple[list[int] | None, int]:
            block_ids = loop.reserve(message.request_id, message.num_prompt_tokens,
                                     message.hold_s, message.prompt_token_ids,
                                     message.tenant or None)
            return block_ids, loop.core.num_reserved_cached(message.request_id)

        block_ids, cached = await self._on_loop(reserve)
        to_write = block_ids[cached:] if block_ids is not None else None
        return Reserved(block_ids, self._kv_grants(to_write, message.hold_s), cached)

    async def _commit(self, message: Commit) -> Ack:
        def commit(loop: EngineLoop) -> None:
            loop.core.commit(message.request_id, message.prompt_token_ids, message.first_token,
                             message.first_logprob, message.params, message.tenant,
                             message.first_top_logprobs)
            loop.settle(message.request_id)  # a refused commit keeps the seat's deadline

        await self._on_loop(commit)
        return Ack()

    async def _release(self, message: Release) -> Ack:
        def release(loop: EngineLoop) -> None:
            loop.settle(message.request_id)
            loop.core.release(message.request_id)

        await self._on_loop(release)
        return Ack()

    async def _abort(self, message: Abort) -> Ack:
        await self._on_loop(lambda loop: loop.abort(message.request_id))
        return Ack()

    def _kv_grants(self, block_ids: list[int] | None, hold_s: float) -> list[bytes]:
        """The prefill may write our reserved blocks, until the reservation would lapse."""
        region = self.core.kv_region
        if not block_ids or region is None or self._transfer is None or self._loop is None:
            return []
        return sign_kv_grants(self._transfer, region, block_ids, self._loop.seat_s(hold_s))

    def _check_role(self, message: Prefill) -> None:
        wants = Role.PREFILL if message.target is not None else Role.BOTH
        if self.config.role != wants:
            raise InvalidParamsError(f"instance {self.instance_id} is a {self.config.role} "
                                     f"instance; this request needs a {wants} instance")

    # -- to the Conductor --------------------------------------------------------------

    def _queue_outputs(self, outputs: list[TokenOutput]) -> None:
        self._outbox.put(Outputs(self.instance_id, outputs))

    def _queue_prefill_done(self, output: TokenOutput, error: str) -> None:
        self._outbox.put(PrefillDone(self.instance_id, output, error))

    async def _report_forever(self) -> None:
        """A failed report is simply sent again: a Conductor that dropped this instance, or
        a restarted one, answers ``known=False`` and only then do we register anew (which
        drops our requests). Registering on every hiccup would drop them while the Conductor
        still counts us live, and it refuses a second registration under a live id."""
        failing = False
        while True:
            try:
                await self._report_once()
                failing = False
            except KvcakeError as exc:
                if not failing:  # once per streak; a refused id is tried again (standby)
                    log.warning("%s: %s", "conductor unreachable" if unreachable(exc)
                                else "the conductor refused this instance", exc)
                failing = True
            await asyncio.sleep(self.config.report_s)

    async def _report_once(self) -> None:
        assert self._loop is not None
        telemetry = self._loop.take_telemetry()
        events = self._events(telemetry.events)
        if not self._registered:
            await self._register(telemetry)
            return
        if not _within_bounds(events):  # the snapshot below stands in for them
            events, self._need_snapshot = [], True
        snapshot = await self._snapshot() if self._need_snapshot else None
        assert telemetry.load is not None, "the engine loop always knows its load"
        report = Report(self.instance_id, _load(telemetry.load), events, snapshot,
                        telemetry.prefill[-MAX_SAMPLES:], telemetry.decode[-MAX_SAMPLES:],
                        telemetry.transfer[-MAX_SAMPLES:])
        reply = decode(await self._conductor.call(encode(report)), ReportReply)
        self._registered = reply.known
        self._need_snapshot = reply.need_snapshot

    def _events(self, raw: list[tuple[str, bytes]]) -> list[KVEvent]:
        """Runs of one kind become one event each, numbered."""
        events: list[KVEvent] = []
        for kind, block_hash in raw:
            if events and events[-1].kind == kind:
                events[-1].block_hashes.append(block_hash)
                continue
            self._seq += 1
            events.append(KVEvent(self._seq, kind, [block_hash]))
        return events

    async def _snapshot(self) -> Snapshot:
        assert self._loop is not None
        core = self.core
        hashes = await asyncio.wrap_future(self._loop.call(
            core.scheduler.kv.cached_hashes))
        return Snapshot(self._seq, hashes[:MAX_BLOCK_HASHES])  # a bigger cache: partly indexed

    async def _register(self, telemetry: Telemetry) -> None:
        core = self.core
        assert self._loop is not None
        if self._ever_registered:  # a new Conductor knows none of our requests: drop them
            loop = self._loop
            dropped = await asyncio.wrap_future(loop.call(loop.abort_all))
            if dropped:
                log.warning("conductor restarted: %d orphaned requests aborted", dropped)
        profile, self._profile = self._profile, Telemetry()
        message = Register(
            self.instance_id, Role(self.config.role), self.endpoint, core.config.model,
            core.fingerprint, core.config.block_size, core.scheduler.kv.num_blocks,
            core.max_model_len, core.kv_region, await self._snapshot(),
            (profile.prefill + telemetry.prefill)[-MAX_SAMPLES:],
            (profile.decode + telemetry.decode)[-MAX_SAMPLES:])
        await self._conductor.call(encode(message))
        self._registered = self._ever_registered = True
        self._need_snapshot = False
        log.info("registered with the conductor at %s as %s", self.config.conductor,
                 self.instance_id)


def _within_bounds(events: list[KVEvent]) -> bool:
    """Whether a report may carry ``events`` (see :mod:`kvcake.conductor.messages`)."""
    return len(events) <= MAX_EVENTS and all(len(e.block_hashes) <= MAX_BLOCK_HASHES
                                             for e in events)


def _load(load: EngineLoad) -> InstanceLoad:
    return InstanceLoad(load.num_waiting, load.num_running, load.num_waiting_tokens,
                        load.num_running_tokens, load.num_free_blocks, load.num_blocks)
