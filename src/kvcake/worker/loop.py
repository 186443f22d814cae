"""The engine thread of an instance: commands in, steps, outputs out.

:class:`~kvcake.engine.EngineCore` is touched by this thread only. The asyncio side hands
it commands (:meth:`EngineLoop.call`), and gets back, through callbacks it must make
thread-safe, the token outputs of every step and each finished prefill.

A prefill with a target (disaggregated) runs with ``max_tokens=1``; :class:`PrefillSender`
writes its blocks into the decode instance as chunks complete::

    chunk 1 done -> write blocks 0..k      (overlaps chunk 2's compute)
    chunk 2 done -> write blocks k+1..m
    last chunk   -> write the rest (with the partial tail block), wait, PrefillDone

Over the network each chunk's blocks go out layer by layer while the chunk computes
(:mod:`kvcake.engine.kv.transfer`), so a prompt of one chunk overlaps its writes too.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from kvcake.common.errors import KvcakeError
from kvcake.engine.core import EngineCore, EngineLoad, StepStats
from kvcake.engine.kv import KVSender
from kvcake.engine.scheduler import SchedulerOutput
from kvcake.wire.conductor import DecodeSample, PrefillSample, TransferSample
from kvcake.wire.output import TokenOutput
from kvcake.wire.worker import Prefill, seat_s

log = logging.getLogger(__name__)
T = TypeVar("T")
_IDLE_WAIT_S = 0.05
_MAX_SAMPLES = 64
GRANT_MARGIN_S = 1.0  # an uncommitted seat outlives its write grants by this much


@dataclass
class _StepSend:
    """A request's blocks this step completes: ``group`` layers a send while the step
    computes (every layer: one send after it), ``sent`` of them on their way so far."""

    request_id: str
    block_ids: list[int]
    group: int
    sent: int = 0


class PrefillSender:
    """The step hook of a prefill instance: sends the blocks each request's chunk completes,
    a group of layers at a time while the step computes where the writes cross the network
    (:meth:`KVSender.layer_group`) unless ``by_layer`` is off (then after the step, in one
    piece: what a benchmark compares)."""

    def __init__(self, sender: KVSender, block_size: int, by_layer: bool = True) -> None:
        self.sender = sender
        self.block_size = block_size
        self.by_layer = by_layer
        self._step: list[_StepSend] = []

    def before_execute(self, output: SchedulerOutput) -> None:
        for request_id in output.preempted:
            self.sender.drain(request_id)  # its freed blocks may be overwritten this step
        num_layers = self.sender.local.num_layers
        self._step = [_StepSend(request_id, block_ids, self.sender.layer_group(
                          request_id, len(block_ids)) if self.by_layer else num_layers)
                      for request_id, block_ids in self._completed(output)]

    def after_layer(self, layer: int) -> None:
        for send in self._step:
            send.sent = self.sender.send_layers(send.request_id, send.block_ids, send.sent,
                                                layer, send.group)

    def after_execute(self, output: SchedulerOutput) -> None:
        step, self._step = self._step, []
        for send in step:
            if send.sent:
                self.sender.advance(send.request_id, len(send.block_ids))
            else:
                self.sender.send(send.request_id, send.block_ids)

    def _completed(self, output: SchedulerOutput) -> list[tuple[str, list[int]]]:
        """The blocks not sent yet that each sending request's chunk fills this step
        (the last chunk fills its partial tail block too)."""
        completed = []
        for chunk in output.chunks:
            request = chunk.request
            if not self.sender.is_sending(request.request_id):
                continue
            end = chunk.start + chunk.num_tokens
            prompt_len = request.num_prompt_tokens
            ready = -(-prompt_len // self.block_size) if end >= prompt_len \
                else end // self.block_size
            sent = self.sender.num_sent_blocks(request.request_id)
            if ready > sent:
                completed.append((request.request_id, request.block_ids[sent:ready]))
        return completed


@dataclass
class Telemetry:
    """What the reporter sends next: samples since the last report and the latest load."""

    prefill: list[PrefillSample] = dataclasses.field(default_factory=list)
    decode: list[DecodeSample] = dataclasses.field(default_factory=list)
    transfer: list[TransferSample] = dataclasses.field(default_factory=list)
    events: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    load: EngineLoad | None = None

    def add_step(self, stats: StepStats) -> None:
        if stats.num_prefill_chunks == 1 and not stats.num_decodes:
            self.prefill.append(PrefillSample(stats.num_prefill_tokens,
                                              stats.num_prefill_context_tokens, stats.seconds))
        elif stats.num_decodes and not stats.num_prefill_chunks:
            self.decode.append(DecodeSample(stats.num_decodes, stats.num_decode_context_tokens,
                                            stats.seconds))
        del self.prefill[:-_MAX_SAMPLES], self.decode[:-_MAX_SAMPLES]


class EngineLoop:
    """Runs the engine in its own thread until :meth:`stop`."""

    def __init__(self, core: EngineCore, sender: KVSender | None,
                 on_outputs: Callable[[list[TokenOutput]], None],
                 on_prefill_done: Callable[[TokenOutput, str], None],
                 reserve_timeout_s: float, transfer_timeout_s: float,
                 send_by_layer: bool = True,
                 on_death: Callable[[BaseException], None] = lambda _: None) -> None:
        self.core = core
        self.sender = sender
        self._on_outputs = on_outputs
        self._on_prefill_done = on_prefill_done
        self._on_death = on_death  # the thread ended on an error: nothing runs any more
        self._reserve_timeout_s = reserve_timeout_s
        self._transfer_timeout_s = transfer_timeout_s
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._deadlines: dict[str, float] = {}
        self._lock = threading.Lock()
        self._telemetry = Telemetry(load=core.load())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvcake-engine", daemon=True)
        if sender is not None:
            core.step_hook = PrefillSender(sender, core.config.block_size, send_by_layer)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(lambda: None)
        if self._thread.ident is not None:  # a worker that failed to start never started it
            self._thread.join(timeout_s)

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` in the engine thread between steps; its result or error in a future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)
        self._commands.put(run)
        return future

    def take_telemetry(self) -> Telemetry:
        with self._lock:
            taken = self._telemetry
            self._telemetry = Telemetry(load=taken.load)
        return taken

    # -- commands (engine thread) ----------------------------------------------------

    def add(self, message: Prefill) -> None:
        params = message.params
        if message.target is not None:
            assert self.sender is not None, "only a prefill instance sends KV"
            target = self.sender.target(message.target, message.target_block_ids,
                                        message.target_grants, message.target_cached_blocks)
            params = dataclasses.replace(params, max_tokens=1,
                                         min_tokens=min(params.min_tokens, 1))
            self.core.add_request(message.request_id, message.prompt_token_ids, params,
                                  message.tenant)
            self.sender.open(message.request_id, target)
            return
        self.core.add_request(message.request_id, message.prompt_token_ids, params,
                              message.tenant)

    def reserve(self, request_id: str, num_prompt_tokens: int, hold_s: float = 0.0,
                prompt_token_ids: Sequence[int] = (), tenant: str | None = None
                ) -> list[int] | None:
        """Blocks held for :meth:`seat_s` (and ``GRANT_MARGIN_S``: the grants are signed a
        moment later, and a write checked just before its grant's end still lands) unless
        committed or released (see :meth:`EngineCore.reserve` for what the prompt's tokens
        add)."""
        block_ids = self.core.reserve(request_id, num_prompt_tokens, prompt_token_ids, tenant)
        if block_ids is not None:
            self._deadlines[request_id] = time.monotonic() + self.seat_s(hold_s) \
                + GRANT_MARGIN_S
        return block_ids

    def seat_s(self, hold_s: float) -> float:
        """How long an uncommitted seat's grants last (:func:`kvcake.wire.worker.seat_s`)."""
        return seat_s(self._reserve_timeout_s, hold_s, self._transfer_timeout_s)

    def settle(self, request_id: str) -> None:
        """The reservation was committed or released: no deadline any more."""
        self._deadlines.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        if self.sender is not None:
            self.sender.cancel(request_id)
        self.core.abort(request_id)
        self.core.release(request_id)
        self.settle(request_id)

    def abort_all(self) -> int:
        """End every request and reservation (their Conductor is gone); how many."""
        request_ids = set(self.core.scheduler.requests) | set(self._deadlines)
        for request_id in request_ids:
            self.abort(request_id)
        return len(request_ids)

    # -- the loop -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_commands(block=not self.core.has_unfinished())
                self._expire_reservations()
                if self.core.has_unfinished():
                    self._step()
                self._publish()
        except BaseException as exc:  # logged where it was raised
            self._on_death(exc)

    def _run_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_WAIT_S) if block \
                else self._commands.get_nowait()
        except queue.Empty:
            return
        command()
        while True:
            try:
                self._commands.get_nowait()()
            except queue.Empty:
                return

    def _step(self) -> None:
        try:
            outputs = self.core.step()
        except Exception:
            log.exception("engine step failed; aborting its requests")
            for request_id in list(self.core.scheduler.requests):
                self.abort(request_id)
            raise
        streamed = []
        for output in outputs:
            if self.sender is not None and self.sender.is_sending(output.request_id):
                self._finish_prefill(output)
            else:
                streamed.append(output)
        if streamed:
            self._on_outputs(streamed)
        if self.core.last_step is not None:
            with self._lock:
                self._telemetry.add_step(self.core.last_step)

    def _finish_prefill(self, output: TokenOutput) -> None:
        assert self.sender is not None
        assert output.finished, "a prefill-only request ends at its first token"
        error = ""
        try:
            num_bytes, seconds = self.sender.wait(output.request_id, self._transfer_timeout_s)
        except KvcakeError as exc:
            error = f"KV transfer failed: {exc}"
        else:
            with self._lock:
                self._telemetry.transfer.append(TransferSample(num_bytes, seconds))
        self._on_prefill_done(output, error)

    def _expire_reservations(self) -> None:
        now = time.monotonic()
        for request_id, deadline in list(self._deadlines.items()):
            if deadline <= now:
                log.warning("reservation %s not committed in time: freed", request_id)
                self.core.release(request_id)
                del self._deadlines[request_id]

    def _publish(self) -> None:
        events = self.core.drain_kv_events()
        load = self.core.load()
        with self._lock:
            self._telemetry.events += events
            self._telemetry.load = load
