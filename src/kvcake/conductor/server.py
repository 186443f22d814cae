"""The Conductor's asyncio driver: instances register and report over RPC; requests are
routed by :class:`~kvcake.conductor.service.ConductorService` and driven through the cluster.

One request, disaggregated (decode D, prefill P)::

    route ─> Reserve(D) ─> Prefill(P, target = D's cache + reserved blocks)
          ─> PrefillDone(P): first token to the client ─> Commit(D) ─> Outputs(D) ...

Colocated (a ``both`` instance): ``Prefill`` without a target, then its ``Outputs``.
An instance silent for ``instance_ttl_s`` is dropped: its flights fail (the API may retry a
decode elsewhere), the index forgets its blocks, and a reservation it held is freed by the
decode instance's own timeout if the Conductor cannot reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from kvcake.common.aio import TaskSet
from kvcake.common.auth import cluster_auth
from kvcake.common.codec import decode, encode
from kvcake.common.errors import (
    ErrorCode,
    InvalidParamsError,
    KvcakeError,
    RequestRejectedError,
)
from kvcake.common.hashing import prefix_block_hashes
from kvcake.common.latency import slowest_gaps_mean
from kvcake.common.log import get_logger
from kvcake.common.rpc import Dispatcher, RpcClient, RpcServer
from kvcake.conductor.config import ConductorConfig, ConductorServerConfig
from kvcake.conductor.flight import Flight, FlightState, InstanceLostError
from kvcake.conductor.service import ConductorService
from kvcake.conductor.store_view import StoreView
from kvcake.conductor.telemetry import ConductorMetrics
from kvcake.conductor.types import RouteRequest
from kvcake.transfer.segment import (
    SegmentDescriptor,
    instance_registrant,
    offers_local_mapping,
    prove_ownership,
)
from kvcake.wire.conductor import (
    ConductorRequest,
    DecodeSample,
    Outputs,
    PrefillDone,
    PrefillSample,
    Register,
    Report,
    ReportReply,
    Role,
    TransferSample,
)
from kvcake.wire.sampling import SamplingParams, fit_context
from kvcake.wire.worker import MAX_HOLD_S, Abort, Commit, Prefill, Release, Reserve, Reserved

log = get_logger(__name__)
_SHUTDOWN_S = 5.0  # background tasks get this long to stop
_RPC_TIMEOUT_S = 30.0
_SWEEP_S = 0.25
_RESERVE_RETRY_S = 0.01
_RESERVE_RETRY_MAX_S = 0.2
_UNAVAILABLE = ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS


@dataclass
class InstanceHandle:
    info: Register
    client: RpcClient
    last_seen: float

    @property
    def instance_id(self) -> str:
        return self.info.instance_id


class ConductorServer:
    """``await startup()`` → serve → ``await shutdown()``."""

    def __init__(self, config: ConductorServerConfig, policy: ConductorConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.policy = policy
        self.clock = clock
        self.service = ConductorService(policy, clock)
        self.instances: dict[str, InstanceHandle] = {}
        self.flights: dict[str, Flight] = {}
        self.metrics = ConductorMetrics()
        self.store = StoreView(config.store_master)
        self.rpc_endpoint = ""
        self.dispatcher = Dispatcher(ConductorRequest, {
            Register: self._register_published, Report: self._report,
            Outputs: self._outputs, PrefillDone: self._prefill_done,
        })
        self._rpc = RpcServer(self.dispatcher, config.rpc_bind_host, config.rpc_port)
        self._tasks = TaskSet()  # the sweeper and each flight's drive
        self._sweeper: asyncio.Task[Any] | None = None

    async def startup(self) -> str:
        await self.store.startup()
        self.rpc_endpoint = await self._rpc.startup()
        self._sweeper = self._tasks.spawn(self._sweep_forever(), "sweeper")
        return self.rpc_endpoint

    async def shutdown(self) -> None:
        print(self.metrics.prefill_summary(self.service.stats()), flush=True)  # closing lines
        if pd_line := self.metrics.pd_summary():
            print(pd_line, flush=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for flight in list(self.flights.values()):
            flight.fail(KvcakeError("the conductor is shutting down"))
        await self._rpc.shutdown()
        await self.store.shutdown()
        await self._tasks.cancel(_SHUTDOWN_S)
        for handle in self.instances.values():
            handle.client.close()

    # -- what instances say -----------------------------------------------------------

    def _register_published(self, message: Register) -> ReportReply | Awaitable[ReportReply]:
        """An instance's KV cache is published as its own (``instance:<id>``): prefill
        instances are handed its memfd only if the instance bound it to that name, and on
        this host the Conductor asks for it first, so a forged region is refused at once."""
        self._refuse_live_twin(message)
        region = message.kv_region
        if region is None:
            self._register(message)
            return ReportReply()
        descriptor = msgspec.structs.replace(
            region.descriptor, registrant=instance_registrant(message.instance_id))
        message = msgspec.structs.replace(
            message, kv_region=msgspec.structs.replace(region, descriptor=descriptor))
        if offers_local_mapping(descriptor):
            return self._register_proven(message, descriptor)
        self._register(message)
        return ReportReply()

    async def _register_proven(self, message: Register, descriptor: SegmentDescriptor
                               ) -> ReportReply:
        owner = await asyncio.to_thread(prove_ownership, descriptor, cluster_auth())
        owner.close()  # liveness here comes from the instance's reports
        self._register(message)
        return ReportReply()

    def _register(self, message: Register) -> None:
        """A bad id, role or count changes nothing; a bad snapshot or sample unregisters the
        instance whole (its old state is gone by then), so the handles and the service agree."""
        self._refuse_live_twin(message)
        self._check_compatible(message)
        if message.instance_id in self.instances:  # dead: restarted under its old name
            self.drop_instance(message.instance_id, "registered again after going silent")
        self.service.add_instance(message.instance_id, message.role, message.num_blocks,
                                  message.max_model_len)
        try:
            self.service.replace_blocks(message.instance_id, message.snapshot.seq,
                                        message.snapshot.block_hashes)
            self._observe(message.prefill_samples, message.decode_samples, [])
        except KvcakeError:
            self.service.remove_instance(message.instance_id)
            raise
        self.instances[message.instance_id] = InstanceHandle(
            message, RpcClient(message.endpoint, _RPC_TIMEOUT_S), self.clock())
        log.info("instance %s (%s) registered from %s with %d cached blocks",
                 message.instance_id, message.role, message.endpoint,
                 len(message.snapshot.block_hashes))

    def _refuse_live_twin(self, message: Register) -> None:
        """An id belongs to one live instance: a second registration under it is refused
        while the first reports; once the first is silent past ``instance_ttl_s`` (or was
        dropped) the id is free again, so a restarted instance, or one a restarted Conductor
        does not know, registers as before."""
        old = self.instances.get(message.instance_id)
        if old is None:
            return
        silent_s = self.clock() - old.last_seen
        if silent_s < self.config.instance_ttl_s:
            raise KvcakeError(
                f"instance id {message.instance_id!r} belongs to a live instance at "
                f"{old.info.endpoint} (heard from {silent_s:.1f}s ago); start this one with "
                f"another --instance-id, or register once that one has been silent for "
                f"{self.config.instance_ttl_s:g}s", ErrorCode.OBJECT_ALREADY_EXISTS)

    def _check_compatible(self, message: Register) -> None:
        if message.block_size != self.policy.block_size:
            raise InvalidParamsError(f"instance {message.instance_id} hashes blocks of "
                                     f"{message.block_size} tokens; the conductor indexes "
                                     f"{self.policy.block_size}")
        other = next(iter(self.instances.values()), None)
        if other is not None and other.instance_id != message.instance_id \
                and other.info.fingerprint != message.fingerprint:
            raise InvalidParamsError(
                f"instance {message.instance_id} serves KV fingerprint {message.fingerprint}; "
                f"this cluster serves {other.info.fingerprint} (another model or dtype)")

    def _report(self, message: Report) -> ReportReply:
        handle = self.instances.get(message.instance_id)
        if handle is None:
            return ReportReply(known=False)
        handle.last_seen = self.clock()
        self.service.report_load(message.instance_id, message.load)
        if message.snapshot is not None:
            self.service.replace_blocks(message.instance_id, message.snapshot.seq,
                                        message.snapshot.block_hashes)
        in_order = self.service.apply_events(message.instance_id, message.events)
        self._observe(message.prefill_samples, message.decode_samples,
                      message.transfer_samples)
        return ReportReply(need_snapshot=not in_order)

    def _observe(self, prefill: list[PrefillSample], decode: list[DecodeSample],
                 transfer: list[TransferSample]) -> None:
        """Every instance runs the same model on the same kind of host: one cost model."""
        for prefill_sample in prefill:
            self.service.observe_prefill(prefill_sample)
        for decode_sample in decode:
            self.service.observe_decode(decode_sample)
        for transfer_sample in transfer:
            self.service.observe_transfer(transfer_sample)
            self.metrics.transfer_bytes.inc(transfer_sample.num_bytes)

    def _outputs(self, message: Outputs) -> ReportReply:
        handle = self.instances.get(message.instance_id)
        if handle is not None:
            handle.last_seen = self.clock()
        for output in message.outputs:
            flight = self.flights.get(output.request_id)
            if flight is not None and flight.decode_id == message.instance_id:
                if flight.colocated and self.service.prefilling(flight.request_id):
                    self._prefill_ended(flight, ok=True)  # its first output ends it
                flight.push(output)
        return ReportReply()

    def _prefill_ended(self, flight: Flight, ok: bool) -> None:
        """The request leaves its prefill instance's queue; a successful prefill's time
        is counted against its prediction."""
        timing = self.service.prefill_done(flight.request_id, ok)
        if ok:
            self.metrics.count_prefill_end(timing)

    def check_hit(self, flight: Flight, num_cached_tokens: int) -> None:
        """Count the prefix routing predicted for ``flight`` against what its prefill
        instance reused (``num_cached_tokens``)."""
        predicted, missed = self.service.check_hit(flight.request_id, num_cached_tokens)
        self.metrics.count_hit(predicted, missed)
        if missed:
            log.info("request %s: %s reused %d prompt tokens, routing predicted %d",
                     flight.request_id, flight.prefill_id, num_cached_tokens, predicted)

    def _prefill_done(self, message: PrefillDone) -> ReportReply:
        flight = self.flights.get(message.output.request_id)
        if flight is not None and not flight.prefill_done.done():
            flight.prefill_done.set_result(message)
        return ReportReply()

    # -- liveness ---------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            deadline = self.clock() - self.config.instance_ttl_s
            for handle in [h for h in self.instances.values() if h.last_seen < deadline]:
                self.drop_instance(handle.instance_id, "stopped reporting")

    def drop_instance(self, instance_id: str, why: str) -> None:
        handle = self.instances.pop(instance_id, None)
        if handle is None:
            return
        log.warning("instance %s %s: dropped", instance_id, why)
        handle.client.close()
        self.service.remove_instance(instance_id)
        self._fail_flights_of(instance_id, why)
        self.metrics.instances_lost.inc()

    def _fail_flights_of(self, instance_id: str, why: str) -> None:
        for flight in list(self.flights.values()):
            if flight.needs(instance_id):
                flight.fail(InstanceLostError(instance_id, flight.request_id))
                log.warning("request %s failed: instance %s %s", flight.request_id,
                            instance_id, why)

    # -- requests ---------------------------------------------------------------------

    def fingerprint(self) -> str:
        handle = next(iter(self.instances.values()), None)
        if handle is None:
            raise KvcakeError("no instance has registered with the conductor yet", _UNAVAILABLE)
        return handle.info.fingerprint

    def max_model_len(self) -> int:
        return min((h.info.max_model_len for h in self.instances.values()), default=0)

    async def submit(self, request_id: str, tokens: list[int], params: SamplingParams,
                     tenant: str) -> Flight:
        """Route and start a request; raises ``RequestRejectedError`` (429) or a
        ``KvcakeError`` (503) when no instance can take it, InvalidParamsError (400) when the
        prompt plus ``max_tokens`` exceed the context. The flight's ``params`` have
        ``max_tokens`` set (None asks for what the context leaves)."""
        if request_id in self.flights:
            raise InvalidParamsError(f"request id {request_id!r} is already in flight")
        params = self._fit(tokens, params)
        assert params.max_tokens is not None, "fit_context sets it"
        salt = f"{self.fingerprint()}/{tenant}".encode()
        hashes = tuple(prefix_block_hashes(tokens, self.policy.block_size, salt))
        store_hits = await self.store.hit_blocks(salt.decode(), hashes)
        decision = self.service.route(RouteRequest(request_id, len(tokens), hashes,
                                                   params.max_tokens, store_hits))
        log.debug("request %s: %d tokens, %d blocks in the store: %s", request_id,
                  len(tokens), store_hits, decision.detail)
        if not decision.accepted:
            self.metrics.rejections.inc(reason=decision.reason or "")
            if decision.reason in ("ttft_slo", "tbt_slo"):
                raise RequestRejectedError(decision.reason, decision.detail)
            raise KvcakeError(f"cannot serve now: {decision.detail}", _UNAVAILABLE)
        assert decision.prefill_id is not None and decision.decode_id is not None
        self.metrics.routed.inc(policy=self.policy.policy, prefill=decision.prefill_id,
                                decode=decision.decode_id)
        flight = Flight(request_id, tokens, params, tenant, decision.prefill_id,
                        decision.decode_id, decision.predicted_ttft_s)
        self.flights[request_id] = flight
        self._tasks.spawn(self._drive(flight), f"drive {request_id}")
        return flight

    def _fit(self, tokens: list[int], params: SamplingParams) -> SamplingParams:
        limit = self.max_model_len()
        if not limit:
            raise KvcakeError("no instance has registered with the conductor yet", _UNAVAILABLE)
        return fit_context(params, len(tokens), limit)

    async def _drive(self, flight: Flight) -> None:
        try:
            if flight.colocated:
                await self._call(flight.prefill_id, Prefill(
                    flight.request_id, flight.prompt_token_ids, flight.params, flight.tenant))
            else:
                await self._disaggregate(flight)
        except KvcakeError as exc:
            flight.fail(exc)
        except Exception as exc:  # the flight must end whatever failed: its client waits
            log.exception("request %s: driving it failed", flight.request_id)
            flight.fail(KvcakeError(f"internal error: {type(exc).__name__}: {exc}"))

    async def _disaggregate(self, flight: Flight) -> None:
        reserved = await self._reserve(flight)
        if not flight.move_to(FlightState.PREFILLING):  # ended meanwhile: its abort may
            await self._release(flight)  # have reached the decode instance before the seat
            return
        target = self.instances[flight.decode_id].info.kv_region
        await self._call(flight.prefill_id, Prefill(
            flight.request_id, flight.prompt_token_ids, flight.params, flight.tenant,
            target, reserved.block_ids or [], reserved.grants, reserved.num_cached_blocks))
        self.metrics.count_reserved(len(reserved.block_ids or ()), reserved.num_cached_blocks)
        done = await flight.prefill_done
        if not done.error:  # the prefill's word on reuse; the decode side cannot know it
            flight.prefill_cached = (done.output.num_cached_tokens,
                                     done.output.num_store_tokens)
            self.check_hit(flight, done.output.num_cached_tokens)
        self._prefill_ended(flight, ok=not done.error)
        if done.error:
            await self._release(flight)
            raise KvcakeError(f"prefill on {flight.prefill_id} failed: {done.error}")
        first = done.output
        if not first.token_ids:  # the decode instance samples the first token itself
            await self._call(flight.decode_id, Commit(
                flight.request_id, flight.prompt_token_ids, -1, 0.0, flight.params,
                flight.tenant))
            flight.move_to(FlightState.DECODING)
            return
        ends = first.finish_reason == "stop" or flight.params.max_tokens == 1
        if ends:
            await self._release(flight)
            flight.push(first)
            return
        first_top = first.top_logprobs[0] if first.top_logprobs else []
        await self._call(flight.decode_id, Commit(
            flight.request_id, flight.prompt_token_ids, first.token_ids[0], first.logprobs[0],
            flight.params, flight.tenant, first_top))
        flight.push(msgspec.structs.replace(first, finish_reason=None))

    async def _reserve(self, flight: Flight) -> Reserved:
        """Room on the decode instance, asked again with backoff while its batch is full:
        the request waits here, before its prefill, rather than slow every token there."""
        deadline = self.clock() + self.config.reserve_wait_s
        pause = _RESERVE_RETRY_S
        while True:
            reply = decode(await self._call(flight.decode_id, Reserve(
                flight.request_id, len(flight.prompt_token_ids),
                _hold_s(flight.predicted_ttft_s), flight.prompt_token_ids, flight.params,
                flight.tenant)), Reserved)
            if reply.block_ids is not None:
                return reply
            if self.clock() >= deadline or flight.state.ended:
                raise KvcakeError(f"decode instance {flight.decode_id} had no room for "
                                  f"{len(flight.prompt_token_ids)} tokens within "
                                  f"{self.config.reserve_wait_s}s", _UNAVAILABLE)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RESERVE_RETRY_MAX_S)

    async def _release(self, flight: Flight) -> None:
        with contextlib.suppress(KvcakeError):
            await self._call(flight.decode_id, Release(flight.request_id))

    async def _call(self, instance_id: str,
                    message: Prefill | Reserve | Commit | Release | Abort) -> bytes:
        """One call to an instance. An instance that is gone or cannot be reached (RPC_FAIL:
        refused, reset, silent) is :class:`InstanceLostError` — 503, try again — rather
        than a 502: the next attempt is routed to a live one."""
        handle = self.instances.get(instance_id)
        if handle is None:
            raise InstanceLostError(instance_id, message.request_id)
        try:
            return await handle.client.call(encode(message))
        except KvcakeError as exc:
            if exc.code is not ErrorCode.RPC_FAIL:
                raise
            raise InstanceLostError(instance_id, message.request_id) from exc

    async def end_request(self, request_id: str) -> None:
        """End the request's flight and any retry of it."""
        for flight_id in [f for f in self.flights
                          if f == request_id or f.startswith(f"{request_id}-retry")]:
            await self.end(self.flights[flight_id])

    async def end(self, flight: Flight) -> None:
        """The API is done with ``flight``: abort what still runs, forget it."""
        self.flights.pop(flight.request_id, None)
        if flight.state is not FlightState.FINISHED:  # live, or failed on one instance
            flight.abort()
            # the prefill instance first: its abort returns once its writes into the
            # decode instance's blocks have ended, and only then may those blocks be freed
            for instance_id in dict.fromkeys((flight.prefill_id, flight.decode_id)):
                with contextlib.suppress(KvcakeError):
                    await self._call(instance_id, Abort(flight.request_id))
        finished = flight.state is FlightState.FINISHED
        self.service.finished(flight.request_id,
                              slowest_gaps_mean(flight.token_gaps()) if finished else None)

    # -- reporting --------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, object]]:
        roles = [h.info.role for h in self.instances.values()]
        counts = {role: roles.count(role) for role in Role}
        ready = bool(counts[Role.BOTH] or (counts[Role.PREFILL] and counts[Role.DECODE]))
        return ready, {"instances": counts, "policy": self.policy.policy,
                       "admission": self.policy.admission, "in_flight": len(self.flights)}

    def render_metrics(self) -> str:
        return self.metrics.render(self.service.stats())


def _hold_s(predicted_ttft_s: float) -> float:
    """How much longer than its base timeout a decode seat waits for its prefill: twice the
    predicted TTFT (queue and prefill; a cost model may be optimistic), within the bound."""
    hold_s = 2.0 * predicted_ttft_s
    return min(hold_s, MAX_HOLD_S) if hold_s >= 0.0 else 0.0  # NaN: no hold
