"""A vLLM server as an instance under kvcake's Conductor: the sidecar (``kvcake
vllm-instance``). It starts vLLM with kvcake's connector, registers with the Conductor and
answers the worker channel (:mod:`kvcake.wire.worker`) by asking vLLM over HTTP::

    Conductor ── Reserve ──> sidecar D ── POST (prompt, kv_transfer_params: decode) ──> vLLM D
                             sidecar D ── AwaitBlocks ──> D's connector: Reserved(blocks)
    Conductor ── Prefill(target) ──> sidecar P ── POST (max_tokens 1, prefill target) ──> vLLM P
                                     vLLM P's connector writes the blocks into D's cache and
                                     tells D's connector; vLLM D computes from there
    Conductor <── PrefillDone ── sidecar P (no first token: vLLM D samples it)
    Conductor ── Commit ──> sidecar D: D's stream, held so far, goes to the Conductor

A colocated instance (``both``) streams a whole request. Release, Abort, a hold that lapses
or a lost Conductor end the request's HTTP call, and vLLM aborts it, freeing its blocks.
Torch-free: vLLM runs in its own process (and venv).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import aiohttp
import msgspec

from kvcake.common.aio import TaskSet
from kvcake.common.codec import decode, encode
from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError, unreachable
from kvcake.common.feed import EventFeed
from kvcake.common.lifespan import StartupTurns
from kvcake.common.log import get_logger
from kvcake.common.rpc import Dispatcher, RpcClient, RpcServer
from kvcake.store.config import DEFAULT_TENANT
from kvcake.vllm.config import VllmInstanceConfig, VllmServerConfig
from kvcake.vllm.launch import VllmServer
from kvcake.vllm.openai import cached_tokens, check_params, chunk_output, completion_body
from kvcake.vllm.pd import PrefillTarget, decode_params, prefill_params
from kvcake.wire.conductor import (
    MAX_BLOCK_HASHES,
    MAX_SAMPLES,
    DecodeSample,
    InstanceLoad,
    KVEvent,
    Outbox,
    Outputs,
    PrefillDone,
    PrefillSample,
    Register,
    Report,
    ReportReply,
    Role,
    Snapshot,
)
from kvcake.wire.kv_events import CacheView
from kvcake.wire.output import TokenOutput
from kvcake.wire.sampling import SamplingParams
from kvcake.wire.vllm import AwaitBlocks, Blocks, Describe, Described, Forget
from kvcake.wire.worker import (
    Abort,
    Ack,
    Commit,
    Prefill,
    Release,
    Reserve,
    Reserved,
    WorkerRequest,
    seat_s,
)

log = get_logger(__name__)
_RPC_TIMEOUT_S = 10.0
_BLOCKS_WAIT_S = 2.0  # a decode instance with no room answers Reserve with None by then
PROFILE_PROMPT_LENS = (128, 512)
PROFILE_BATCHES = (1, 4)
_PROFILE_DECODE_TOKENS = 6


def connector_transfer(master: str, control: str, control_file: str, instance_id: str,
                       tenant: str = "") -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` for a sidecar's instance: kvcake's connector on the
    store, with its P/D control channel."""
    extra = {"master": master, "control": control, "control_file": control_file,
             "instance_id": instance_id, **({"tenant": tenant} if tenant else {})}
    return {"kv_connector": "KvcakeConnector", "kv_role": "kv_both",
            "kv_connector_module_path": "kvcake.vllm.connector",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


@dataclasses.dataclass
class _Request:
    """One request this instance runs: its HTTP call's task and, on a decode instance,
    its outputs held until the Conductor commits it."""

    request_id: str
    num_prompt_tokens: int
    task: asyncio.Task[None] | None = None
    committed: bool = False
    done: bool = False  # its HTTP call ended
    num_output_tokens: int = 0
    first_token_s: float | None = None  # a colocated request's prefill time
    closed: bool = False  # its last output went out, with vLLM's count of reused tokens
    held: list[TokenOutput] = dataclasses.field(default_factory=list)
    deadline: float = float("inf")  # monotonic: a reservation not committed by then ends


class Company:
    """Which requests ran alone on the instance. A prefill's wall time is a sample of the
    instance's prefill speed only if nothing else ran beside it: under load the time holds
    waiting, which the Conductor models itself (its queue), and samples holding it would
    have the cost model count that wait twice."""

    def __init__(self) -> None:
        self._shared: dict[str, bool] = {}  # by request id, while it runs: it had company

    def begin(self, request_id: str) -> None:
        for other in self._shared:
            self._shared[other] = True
        self._shared[request_id] = bool(self._shared)

    def alone(self, request_id: str) -> bool:
        """Whether ``request_id`` has run alone so far."""
        return not self._shared.get(request_id, True)

    def end(self, request_id: str) -> None:
        self._shared.pop(request_id, None)


@dataclasses.dataclass
class _Samples:
    """Step times not yet reported (the newest ``MAX_SAMPLES`` of each kind)."""

    prefill: list[PrefillSample] = dataclasses.field(default_factory=list)
    decode: list[DecodeSample] = dataclasses.field(default_factory=list)

    def take(self) -> tuple[list[PrefillSample], list[DecodeSample]]:
        prefill, decode = self.prefill[-MAX_SAMPLES:], self.decode[-MAX_SAMPLES:]
        self.prefill, self.decode = [], []
        return prefill, decode


def pd_summary(role: Role, counts: dict[str, int]) -> str:
    """The closing line of a P/D instance: what a decode instance received, or what a
    prefill instance wrote (how many of those requests layer by layer) and at what rate
    while its writes were in flight."""
    if role == Role.DECODE:
        return (f"kvcake P/D: {counts.get('received', 0)} requests' KV received from prefill "
                f"instances ({counts.get('received_blocks', 0)} blocks), "
                f"{counts.get('failed', 0)} given up on")
    sent, seconds = counts.get("pd_sent_bytes", 0), counts.get("pd_writing_us", 0) / 1e6
    rate = f"{sent / seconds / 1e9:.2f} GB/s" if seconds > 0 else "-"
    return (f"kvcake P/D: {counts.get('pd_sent', 0)} requests' KV written into decode "
            f"instances ({counts.get('pd_sent_by_layer', 0)} layer by layer), "
            f"{sent / 2**20:.1f} MiB in {seconds:.3f} s of writes in flight: {rate}")


class VllmInstanceServer:
    """``await startup()`` → serve → ``await shutdown()``."""

    def __init__(self, config: VllmInstanceConfig, server: VllmServerConfig,
                 log_file: IO[bytes] | None = None) -> None:
        self.config = config
        self._turns = StartupTurns(config.profile_lock)  # siblings profile once all loaded
        self.server_config = server
        self.role = Role(config.role)
        self.instance_id = config.instance_id or f"{config.role}-{os.getpid()}"
        self.endpoint = ""
        self._dir = tempfile.TemporaryDirectory(prefix="kvcake-vllm-")
        control_file = str(Path(self._dir.name) / "control")
        self.vllm = VllmServer(server, connector_transfer(
            server.store_master, f"{config.host}:0", control_file, self.instance_id),
            log_file)
        self._control_file = control_file
        self.described: Described | None = None
        self._conductor = RpcClient(config.conductor, _RPC_TIMEOUT_S)
        self._control: RpcClient | None = None
        self._http: aiohttp.ClientSession | None = None
        self._rpc: RpcServer | None = None
        self._requests: dict[str, _Request] = {}
        self._outbox = Outbox(self._conductor)
        self._tasks = TaskSet()
        self._registered = False
        self._need_snapshot = False
        self._samples = _Samples()
        self._company = Company()
        self._seq = 0  # of the KV events reported
        self.cache: CacheView | None = None

    # -- life --------------------------------------------------------------------------

    async def startup(self, stopping: asyncio.Event | None = None) -> str:
        """Start vLLM and serve; returns ``""`` if ``stopping`` is set first (a stop
        signal while vLLM starts: :meth:`shutdown` then stops it at once)."""
        self.vllm.launch()
        while not await asyncio.to_thread(self.vllm.check_starting):
            if stopping is not None and stopping.is_set():
                return ""
            await asyncio.sleep(0.5)
        control = Path(self._control_file).read_text().strip()
        self._control = RpcClient(control, _RPC_TIMEOUT_S)
        self.described = decode(await self._control.call(encode(Describe())), Described)
        if self.role == Role.DECODE and self.described.region is None:
            raise KvcakeError("vLLM's KV cache is not in a segment: its connector has no P/D")
        # the Conductor hashes prompts salted so; the view hashes vLLM's blocks the same way
        self.cache = CacheView(f"{self.described.fingerprint}/{DEFAULT_TENANT}".encode())
        feed = EventFeed(self.vllm.events, self.vllm.events_replay, self.cache.apply)
        self._tasks.spawn(feed.run(), "kv events")
        self._http = aiohttp.ClientSession(self.vllm.url, timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=10.0))
        dispatcher = Dispatcher(WorkerRequest, {
            Prefill: self._prefill, Reserve: self._reserve, Commit: self._commit,
            Release: self._release, Abort: self._abort})
        async with self._turns.turn_async():
            await self._profile()
        self._rpc = RpcServer(dispatcher, self.config.host, self.config.port)
        self.endpoint = await self._rpc.startup()
        self._tasks.spawn(self._report_forever(), "report")
        self._tasks.spawn(self._outbox.send_forever(), "outbox")
        return self.endpoint

    async def shutdown(self) -> None:
        await self._log_counts()
        for request in list(self._requests.values()):
            self._end(request)
        if self._rpc is not None:
            await self._rpc.shutdown()
        await self._tasks.cancel(5.0)
        if self._http is not None:
            await self._http.close()
        self._conductor.close()
        if self._control is not None:
            self._control.close()
        await asyncio.to_thread(self.vllm.stop)
        self._dir.cleanup()

    async def _profile(self) -> None:
        """A few timed requests of random tokens before registering, so the Conductor's cost
        model has this instance's step times before traffic (and vLLM's first forward's
        one-time set-up is paid here)."""
        rng = random.Random(0)
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        vocab = range(1000, 40000)
        if self.role != Role.DECODE:
            for n in PROFILE_PROMPT_LENS:
                body = completion_body(self.server_config.served_model_name,
                                       rng.choices(vocab, k=n), params, stream=False)
                started = time.monotonic()
                await self._completion(body)
                self._samples.prefill.append(PrefillSample(n, 0, time.monotonic() - started))
        if self.role != Role.PREFILL:
            for batch in PROFILE_BATCHES:
                streams = [completion_body(
                    self.server_config.served_model_name, rng.choices(vocab, k=64),
                    dataclasses.replace(params, max_tokens=_PROFILE_DECODE_TOKENS),
                    stream=True) for _ in range(batch)]
                gaps = await asyncio.gather(*(self._gaps(body) for body in streams))
                for gap in [g for per_stream in gaps for g in per_stream]:
                    self._samples.decode.append(DecodeSample(batch, batch * 64, gap))

    async def _gaps(self, body: dict[str, Any]) -> list[float]:
        """Seconds between a stream's tokens, its first excluded."""
        gaps, last = [], None
        async for chunk in self._completion_chunks(body):
            if chunk_output("profile", chunk, 0) is None:
                continue
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last = now
        return gaps

    async def _log_counts(self) -> None:
        """Say what this instance's P/D moved (asked while vLLM still runs), beside its
        announcement: the instance's closing summary."""
        if self._control is None or self.role == Role.BOTH:
            return
        with contextlib.suppress(KvcakeError):
            counts = decode(await self._control.call(encode(Describe())), Described).counts
            print(pd_summary(self.role, counts), flush=True)

    # -- the worker channel ------------------------------------------------------------

    def _prefill(self, message: Prefill) -> Ack:
        self._check_new(message.request_id)
        check_params(message.params)
        if message.target is None:
            if self.role != Role.BOTH:
                raise InvalidParamsError(f"instance {self.instance_id} is a {self.role} "
                                         f"instance; a request without a target needs a "
                                         f"colocated one")
            request = self._track(message.request_id, len(message.prompt_token_ids))
            request.committed = True
            body = completion_body(self.server_config.served_model_name,
                                   message.prompt_token_ids, message.params, stream=True)
            request.task = self._tasks.spawn(self._stream(request, body),
                                             f"stream {message.request_id}")
            return Ack()
        if self.role != Role.PREFILL:
            raise InvalidParamsError(f"instance {self.instance_id} is a {self.role} instance; "
                                     f"a request with a target needs a prefill instance")
        request = self._track(message.request_id, len(message.prompt_token_ids))
        target = PrefillTarget(message.request_id, message.target, message.target_block_ids,
                               message.target_grants)
        body = completion_body(self.server_config.served_model_name, message.prompt_token_ids,
                               message.params, stream=False, max_tokens=1,
                               kv_transfer_params=prefill_params(target))
        body["min_tokens"] = 0
        request.task = self._tasks.spawn(self._prefill_for(request, body),
                                         f"prefill {message.request_id}")
        return Ack()

    async def _reserve(self, message: Reserve) -> Reserved:
        if self.role != Role.DECODE:
            raise InvalidParamsError(f"instance {self.instance_id} is a {self.role} instance; "
                                     f"reservations are a decode instance's")
        if message.params is None or len(message.prompt_token_ids) != message.num_prompt_tokens:
            raise InvalidParamsError("a vLLM decode instance needs the prompt and its "
                                     "parameters with the reservation")
        self._check_new(message.request_id)
        check_params(message.params)
        request = self._track(message.request_id, message.num_prompt_tokens)
        request.deadline = time.monotonic() + self._seat_s(message.hold_s)
        body = completion_body(self.server_config.served_model_name, message.prompt_token_ids,
                               message.params, stream=True,
                               kv_transfer_params=decode_params(message.request_id))
        request.task = self._tasks.spawn(self._stream(request, body),
                                         f"decode {message.request_id}")
        started = time.monotonic()
        blocks = await self._await_blocks(message.request_id, message.hold_s)
        log.debug("reserve %s: %s blocks in %.3f s", message.request_id,
                  None if blocks.block_ids is None else len(blocks.block_ids),
                  time.monotonic() - started)
        if blocks.block_ids is None:
            self._end(request)
        return Reserved(blocks.block_ids, blocks.grants)

    async def _await_blocks(self, key: str, hold_s: float) -> Blocks:
        assert self._control is not None
        reply = await self._control.call(encode(AwaitBlocks(key, _BLOCKS_WAIT_S,
                                                            self._seat_s(hold_s))))
        return decode(reply, Blocks)

    def _seat_s(self, hold_s: float) -> float:
        return seat_s(self.config.reserve_timeout_s, hold_s, self.config.transfer_timeout_s)

    def _commit(self, message: Commit) -> Ack:
        request = self._requests.get(message.request_id)
        if request is None:
            raise KvcakeError(f"request {message.request_id!r} holds no reservation here "
                              f"(released, or its hold lapsed)", ErrorCode.OBJECT_NOT_FOUND)
        log.debug("commit %s: %d outputs held", message.request_id, len(request.held))
        request.committed = True
        request.deadline = float("inf")
        for output in request.held:
            self._emit(request, output)
        request.held.clear()
        if request.done:  # vLLM finished it before the Conductor committed
            self._requests.pop(request.request_id, None)
        return Ack()

    async def _release(self, message: Release) -> Ack:
        await self._forget(message.request_id)
        return Ack()

    async def _abort(self, message: Abort) -> Ack:
        await self._forget(message.request_id)
        return Ack()

    async def _forget(self, request_id: str) -> None:
        request = self._requests.get(request_id)
        if request is not None:
            self._end(request)
        if self._control is not None and self.role == Role.DECODE:
            with contextlib.suppress(KvcakeError):
                await self._control.call(encode(Forget(request_id)))

    def _check_new(self, request_id: str) -> None:
        if request_id in self._requests:
            raise InvalidParamsError(f"request id {request_id!r} is already running here")

    def _track(self, request_id: str, num_prompt_tokens: int) -> _Request:
        request = self._requests[request_id] = _Request(request_id, num_prompt_tokens)
        return request

    def _end(self, request: _Request) -> None:
        """Forget the request; cancelling its task closes its HTTP call: vLLM aborts it."""
        self._requests.pop(request.request_id, None)
        if request.task is not None and not request.task.done() \
                and request.task is not asyncio.current_task():
            request.task.cancel()

    # -- vLLM --------------------------------------------------------------------------

    async def _stream(self, request: _Request, body: dict[str, Any]) -> None:
        """Stream the request's tokens to the Conductor, or hold them until it commits. The
        last output waits for vLLM's closing usage chunk, the only one that says how many
        prompt tokens vLLM reused: the Conductor learns them with the request's end."""
        finished: TokenOutput | None = None
        started = last = time.monotonic()
        self._company.begin(request.request_id)
        try:
            async for chunk in self._completion_chunks(body):
                cached = cached_tokens(chunk)
                if finished is not None and cached is not None:
                    self._closing(request, finished, cached)
                output = chunk_output(request.request_id, chunk, request.num_prompt_tokens)
                if output is None:
                    continue
                now = time.monotonic()
                self._observe(request, output, now - (last if request.num_output_tokens
                                                      else started))
                last = now
                if output.finish_reason is not None:
                    finished = output  # its usage chunk comes next
                    continue
                self._deliver(request, output)
        except KvcakeError as exc:
            log.warning("request %s failed on vLLM: %s", request.request_id, exc)
        finally:
            self._company.end(request.request_id)
            if finished is not None and not request.closed:
                self._deliver(request, finished)
            elif finished is None:
                self._deliver(request, TokenOutput(request.request_id, [], [], "abort",
                                                   request.num_prompt_tokens, 0, 0))
            request.done = True
            if request.committed:
                self._requests.pop(request.request_id, None)

    def _closing(self, request: _Request, output: TokenOutput, cached: int) -> None:
        """The request's last output with the prompt tokens vLLM reused; a colocated
        request's prefill sample (its first token's time) now knows them too."""
        request.closed = True
        if request.first_token_s is not None:
            self._samples.prefill.append(PrefillSample(
                request.num_prompt_tokens - cached, cached, request.first_token_s))
        self._deliver(request, msgspec.structs.replace(output, num_cached_tokens=cached))

    def _deliver(self, request: _Request, output: TokenOutput) -> None:
        if request.committed:
            self._emit(request, output)
        else:
            request.held.append(output)

    def _observe(self, request: _Request, output: TokenOutput, seconds: float) -> None:
        """Step times for the Conductor's cost model: a colocated request's first token is
        its prefill; every later token one decode step of the batch it ran in."""
        if not output.token_ids:
            return
        if request.num_output_tokens == 0:
            if self.role == Role.BOTH and self._company.alone(request.request_id):
                request.first_token_s = seconds  # sampled once vLLM says what it reused
        else:
            running = [r for r in self._requests.values() if r.num_output_tokens]
            context = sum(r.num_prompt_tokens + r.num_output_tokens for r in running)
            self._samples.decode.append(DecodeSample(max(len(running), 1), context,
                                                     seconds / len(output.token_ids)))
        request.num_output_tokens += len(output.token_ids)

    async def _prefill_for(self, request: _Request, body: dict[str, Any]) -> None:
        error = ""
        cached = 0
        started = time.monotonic()
        self._company.begin(request.request_id)
        try:
            answer = await self._completion(body)
            usage = answer.get("usage") or {}
            cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            if self._company.alone(request.request_id):
                self._samples.prefill.append(PrefillSample(
                    request.num_prompt_tokens - cached, cached, time.monotonic() - started))
            log.debug("prefill %s: %d tokens (%d cached) in %.3f s", request.request_id,
                      request.num_prompt_tokens, cached, time.monotonic() - started)
        except KvcakeError as exc:
            error = str(exc)
        finally:
            self._company.end(request.request_id)
            self._requests.pop(request.request_id, None)
        self._outbox.put(PrefillDone(self.instance_id, TokenOutput(
            request.request_id, [], [], None, request.num_prompt_tokens, cached, 0), error))

    @contextlib.asynccontextmanager
    async def _post(self, body: dict[str, Any]) -> AsyncIterator[aiohttp.ClientResponse]:
        """One ``/v1/completions`` call; vLLM's refusals and lost connections become
        :class:`KvcakeError` (``RPC_FAIL`` for the latter)."""
        assert self._http is not None
        try:
            async with self._http.post("/v1/completions", json=body) as reply:
                if reply.status != 200:
                    raise KvcakeError(f"vLLM answered {reply.status}: "
                                      f"{(await reply.text())[:500]}")
                yield reply
        except aiohttp.ClientError as exc:
            raise KvcakeError(f"vLLM at {self.vllm.url} failed: {exc!r}",
                              ErrorCode.RPC_FAIL) from exc

    async def _completion_chunks(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async with self._post(body) as reply:
            async for line in reply.content:
                text = line.decode().strip()
                if not text.startswith("data:"):
                    continue
                data = text.removeprefix("data:").strip()
                if data == "[DONE]":
                    return
                yield json.loads(data)

    async def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        async with self._post(body) as reply:
            answer: dict[str, Any] = await reply.json()
            return answer

    # -- to the Conductor --------------------------------------------------------------

    def _emit(self, request: _Request, output: TokenOutput) -> None:
        self._outbox.put(Outputs(self.instance_id, [output]))

    async def _report_forever(self) -> None:
        failing = False
        while True:
            if not self.vllm.alive():  # the instance is gone: so is this sidecar
                log.error("vLLM at %s exited (code %s); stopping", self.vllm.url,
                          self.vllm.process.returncode if self.vllm.process else None)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            self._expire_holds()
            try:
                await self._report_once()
                failing = False
            except KvcakeError as exc:
                if not failing:  # once per streak; a refused instance is tried again
                    log.warning("%s: %s", "conductor unreachable" if unreachable(exc)
                                else "the conductor refused this instance", exc)
                failing = True
            await asyncio.sleep(self.config.report_s)

    def _expire_holds(self) -> None:
        now = time.monotonic()
        for request in [r for r in self._requests.values() if r.deadline < now]:
            log.warning("request %s: reservation never committed; freed", request.request_id)
            self._end(request)

    async def _report_once(self) -> None:
        if not self._registered:
            await self._register()
            return
        snapshot = self._snapshot() if self._need_snapshot else None
        prefill, decode_samples = self._samples.take()
        report = Report(self.instance_id, self._load(), self._events(), snapshot, prefill,
                        decode_samples)
        reply = decode(await self._conductor.call(encode(report)), ReportReply)
        self._registered = reply.known
        self._need_snapshot = reply.need_snapshot

    def _events(self) -> list[KVEvent]:
        """The view's changes since the last report, runs of one kind as one event each."""
        assert self.cache is not None
        events: list[KVEvent] = []
        for kind, block_hash in self.cache.take_changes():
            if events and events[-1].kind == kind and kind != "cleared":
                events[-1].block_hashes.append(block_hash)
                continue
            self._seq += 1
            events.append(KVEvent(self._seq, kind, [block_hash] if kind != "cleared" else []))
        return events

    def _snapshot(self) -> Snapshot:
        assert self.cache is not None
        self.cache.take_changes()  # the snapshot holds them
        return Snapshot(self._seq, self.cache.hashes()[:MAX_BLOCK_HASHES])

    def _load(self) -> InstanceLoad:
        described = self.described
        assert described is not None
        running = list(self._requests.values())
        tokens = sum(r.num_prompt_tokens for r in running)
        used = -(-tokens // described.block_size)
        return InstanceLoad(0, len(running), 0, tokens, max(described.num_blocks - used, 0),
                            described.num_blocks)

    async def _register(self) -> None:
        described = self.described
        assert described is not None
        for request in list(self._requests.values()):  # a new Conductor knows none of them
            self._end(request)
        region = described.region if self.role == Role.DECODE else None
        prefill, decode_samples = self._samples.take()
        message = Register(self.instance_id, self.role, self.endpoint,
                           self.server_config.served_model_name, described.fingerprint,
                           described.block_size, described.num_blocks,
                           self.server_config.max_model_len, region, self._snapshot(),
                           prefill, decode_samples)
        await self._conductor.call(encode(message))
        self._registered = True
        self._need_snapshot = False
        log.info("registered with the conductor at %s as %s (vLLM at %s)",
                 self.config.conductor, self.instance_id, self.vllm.url)
