"""Serving faults: a decode instance killed mid-stream, a prefill instance killed while a
prompt's KV is being computed and written to its decode instance, the Conductor killed and
started again (its prefix index must come back whole), a prefill instance killed and started
again under its name (the index must forget what it held).

A small ``kvcake up``-style cluster (:class:`~kvcake.cluster.Cluster`, SmolLM2 workers,
round-robin routing so every instance gets requests) under a few lanes of streaming
``/v1/completions``. Every request must end with a full answer (``max_tokens`` tokens, then
``[DONE]``), or a clear error (an HTTP error status, or an error event in the stream) within
its deadline. A stream that just stops, or a short answer without an error, counts as a
wrong answer; one still open at its deadline is a hang. Afterwards every surviving
instance must report all its KV blocks free.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import tempfile
import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import aiohttp

from kvcake.chaos.ledger import HANG, OK, Ledger
from kvcake.chaos.scenario import ChaosSettings, Scenario, ScenarioResult
from kvcake.cluster import Cluster, ClusterSpec
from kvcake.ops import NetnsPair

WRONG = ("cut_off", "short_answer")  # neither a full answer nor a clear error
_WORDS = ("cache", "prefix", "block", "decode", "prefill", "token", "pool", "store", "node",
          "moon", "layer", "batch", "segment", "replica", "lease", "master")


@dataclass
class InFlight:
    started: float
    tokens: int = 0


@dataclass(frozen=True)
class StreamConfig:
    """lanes: concurrent streams. prompt_words: prompt length range, words.
    max_tokens: each answer's length (``ignore_eos``). deadline_s: a stream still open after
    this long is a hang."""

    seed: int
    tag: str
    lanes: int = 3
    prompt_words: tuple[int, int] = (20, 60)
    max_tokens: int = 24
    deadline_s: float = 60.0
    shared_words: int = 0  # a lane's prompts open with a preamble this long, the same each time


class StreamWorkload:
    def __init__(self, endpoint: str, config: StreamConfig, ledger: Ledger) -> None:
        self.url = f"http://{endpoint}/v1/completions"
        self.config = config
        self.ledger = ledger
        self.in_flight: dict[int, InFlight] = {}

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession(trust_env=False) as session:
            await asyncio.gather(*(self._lane(session, lane, stop)
                                   for lane in range(self.config.lanes)))

    async def _lane(self, session: aiohttp.ClientSession, lane: int,
                    stop: asyncio.Event) -> None:
        rng = random.Random(f"{self.config.seed}/{self.config.tag}/{lane}")
        n = 0
        while not stop.is_set():
            await self.request(session, lane, self._prompt(rng, lane, n))
            n += 1
            await asyncio.sleep(rng.uniform(0.0, 0.2))

    def _prompt(self, rng: random.Random, lane: int, n: int) -> str:
        count = rng.randint(*self.config.prompt_words)
        preamble = random.Random(f"{self.config.seed}/{self.config.tag}/{lane}/preamble")
        shared = "".join(preamble.choice(_WORDS) + " "
                         for _ in range(self.config.shared_words))
        return f"{shared}Request {lane}.{n}: " + " ".join(rng.choice(_WORDS) for _ in range(count))

    async def request(self, session: aiohttp.ClientSession, lane: int, prompt: str) -> str:
        started = self.ledger.clock()
        self.in_flight[lane] = flight = InFlight(started)
        try:
            result = await asyncio.wait_for(self._stream(session, prompt, flight),
                                            self.config.deadline_s)
        except TimeoutError:
            result = HANG
        except aiohttp.ClientError as exc:
            result = f"connection_{type(exc).__name__}"
        finally:
            del self.in_flight[lane]
        self.ledger.record("stream", result, started)
        return result

    async def _stream(self, session: aiohttp.ClientSession, prompt: str,
                      flight: InFlight) -> str:
        body = {"model": "smollm2", "prompt": prompt, "max_tokens": self.config.max_tokens,
                "temperature": 0, "stream": True, "ignore_eos": True}
        async with session.post(self.url, json=body) as reply:
            if reply.status != 200:
                await reply.read()
                return f"http_{reply.status}"
            async for raw in reply.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    return OK if flight.tokens == self.config.max_tokens else "short_answer"
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return "stream_error"
                flight.tokens += sum(1 for c in chunk.get("choices", ()) if c.get("text"))
        return "cut_off"


class ServingScenario(Scenario):
    needs = ("model",)
    victim: ClassVar[str]  # the instance killed
    victim_returns: ClassVar[bool] = False  # whether it is started again (its blocks checked)
    prefill: ClassVar[int] = 1
    decode: ClassVar[int] = 2
    policy: ClassVar[str] = "round_robin"
    profile: ClassVar[bool] = False  # round robin prices nothing: no start-up profile wanted
    warmup_s = (3.0, 6.0)
    window_s = (4.0, 8.0)
    settle_s = (4.0, 8.0)

    def __init__(self, settings: ChaosSettings, hosts: NetnsPair | None = None) -> None:
        super().__init__(settings, hosts)
        self.cluster: Cluster | None = None
        self.workload: StreamWorkload | None = None
        self._logs = tempfile.TemporaryDirectory(prefix="kvcake-chaos-")

    def stream_config(self) -> StreamConfig:
        return StreamConfig(self.settings.seed, self.name,
                            max_tokens=12 if self.settings.quick else 32)

    def start(self) -> None:
        spec = ClusterSpec(port=0, prefill=self.prefill, decode=self.decode, store_size="0",
                           kv_cache_size="32MiB", policy=self.policy, max_num_seqs=8,
                           log_dir=self._logs.name, profile=self.profile)
        self.cluster = Cluster(spec)
        started = time.monotonic()
        self.cluster.start()
        self.notes.append(f"cluster up in {time.monotonic() - started:.0f} s")

    async def open(self) -> None:
        assert self.cluster is not None
        self.workload = StreamWorkload(self.cluster.api_endpoint, self.stream_config(),
                                       self.ledger)

    async def load(self, stop: asyncio.Event) -> None:
        assert self.workload is not None
        await self.workload.run(stop)

    async def before_fault(self) -> None:
        """Wait (at most 15 s) until some stream is at the point the fault should hit."""
        deadline = time.monotonic() + 15.0
        while not self.at_fault_point() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if not self.at_fault_point():
            self.notes.append("fault point not reached; killed anyway")

    @abstractmethod
    def at_fault_point(self) -> bool:
        """Whether the load has reached the moment this scenario's fault is for."""

    async def fault(self) -> None:
        assert self.cluster is not None
        process = next(p for p in self.cluster.processes if p.name == self.victim)
        os.kill(process.pid, signal.SIGKILL)

    async def check(self, fault_at: float) -> ScenarioResult:
        recover = self.ledger.recovery_s(fault_at)
        return ScenarioResult(
            self.name, self.ledger.num_operations, self.ledger.errors(),
            wrong_bytes=sum(self.ledger.count(kind) for kind in WRONG),
            hangs=self.ledger.count(HANG), recover_s=None if recover is None
            else round(recover, 2), integrity=await asyncio.to_thread(self._blocks_free))

    def _blocks_free(self, timeout_s: float = 40.0) -> str:
        """``ok`` once every surviving instance reports all its KV blocks free."""
        assert self.cluster is not None
        started = time.monotonic()
        while True:
            free, total = _kv_gauges(self.cluster.api_endpoint)
            live = {name for name in total if self.victim_returns or name != self.victim}
            held = {name: f"{free.get(name, 0):.0f}/{total[name]:.0f} free" for name in live
                    if free.get(name) != total[name]}
            if live and not held:
                self.notes.append(f"all KV blocks free {time.monotonic() - started:.1f} s "
                                  "after the load stopped")
                return "ok"
            if time.monotonic() - started > timeout_s:
                return f"KV blocks held: {held or 'no gauges'}"
            time.sleep(0.25)

    def stop_processes(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        self._logs.cleanup()


def _metrics(endpoint: str) -> str:
    """The Conductor's Prometheus page."""
    from kvcake.ops.process import DIRECT

    with DIRECT.open(f"http://{endpoint}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def _kv_gauges(endpoint: str) -> tuple[dict[str, float], dict[str, float]]:
    text = _metrics(endpoint)
    free, total = ({m.group(1): float(m.group(2)) for m in re.finditer(
        rf'^{name}{{instance="([^"]+)"}} (\S+)$', text, re.M)}
        for name in ("kvcake_instance_free_kv_blocks", "kvcake_instance_kv_blocks"))
    return free, total


class DecodeKill(ServingScenario):
    name = "decode-kill"
    summary = "kill -9 a decode instance while its requests stream"
    victim = "decode-1"

    def at_fault_point(self) -> bool:
        assert self.workload is not None
        return any(f.tokens >= 2 for f in self.workload.in_flight.values())


class PrefillKill(ServingScenario):
    name = "prefill-kill"
    summary = "kill -9 a prefill instance while it computes and sends a prompt's KV"
    victim = "prefill-0"
    prefill = 2
    decode = 1

    def stream_config(self) -> StreamConfig:
        return StreamConfig(self.settings.seed, self.name, prompt_words=(150, 300),
                            max_tokens=8 if self.settings.quick else 24)

    def at_fault_point(self) -> bool:
        assert self.workload is not None
        now = self.ledger.clock()
        return any(f.tokens == 0 and now - f.started > 0.1
                   for f in self.workload.in_flight.values())


class PrefixScenario(ServingScenario):
    """A restart mid-replay that the Conductor's prefix index must survive: afterwards every
    prefix hit it predicts must be one the prefill instance finds
    (``kvcake_conductor_predicted_hit_tokens_total{outcome="missed"}`` does not grow). Each
    lane repeats a prefix of its own, one request at a time, so hits are many and no two
    requests compute the same prefix at once (a hit on a prefix still being computed is no
    stale entry)."""

    prefill = 2
    decode = 1
    policy = "cache_aware"
    profile = True  # its estimates price each instance's prefill

    def __init__(self, settings: ChaosSettings, hosts: NetnsPair | None = None) -> None:
        super().__init__(settings, hosts)
        self._hits_before = (0.0, 0.0)  # found, missed: when the restart was over

    def stream_config(self) -> StreamConfig:
        return StreamConfig(self.settings.seed, self.name, prompt_words=(8, 16),
                            max_tokens=8 if self.settings.quick else 16, shared_words=80)

    def at_fault_point(self) -> bool:
        return True

    @abstractmethod
    def restart(self) -> str:
        """Start what the fault killed again (blocking); a note on how it went."""

    async def repair(self) -> None:
        assert self.cluster is not None
        started = time.monotonic()
        note = await asyncio.to_thread(self.restart)
        self.notes.append(f"{note} in {time.monotonic() - started:.1f} s")
        self._hits_before = await asyncio.to_thread(_predicted_hits, self.cluster.api_endpoint)

    async def check(self, fault_at: float) -> ScenarioResult:
        result = await super().check(fault_at)
        assert self.cluster is not None
        found, missed = await asyncio.to_thread(_predicted_hits, self.cluster.api_endpoint)
        found -= self._hits_before[0]
        missed -= self._hits_before[1]
        self.notes.append(f"after the restart: {found:.0f} predicted prefix tokens found, "
                          f"{missed:.0f} missed")
        if found <= 0:
            result.integrity = "no prefix hit was predicted after the restart"
        elif missed and result.integrity == "ok":
            result.integrity = f"{missed:.0f} predicted prefix tokens were not cached"
        return result


class ConductorRestart(PrefixScenario):
    """The Conductor dies mid-replay and another starts on its ports. The instances
    register with it again, each with a snapshot of its cache, so the prefix index is whole
    at once."""

    name = "conductor-restart"
    summary = "kill -9 the Conductor mid-replay, start another on its ports; no predicted " \
              "prefix hit may be missed after"
    victim = "conductor"

    def restart(self) -> str:
        assert self.cluster is not None
        self.cluster.restart_conductor()
        return "a new Conductor had every instance back"


class InstanceRestart(PrefixScenario):
    """A prefill instance dies mid-replay and starts again under its name with an empty
    cache. The Conductor drops the dead one, and with it every prefix it held, once it has
    been silent for the instance TTL; the new one registers with an empty snapshot, so no
    prediction may count on what died."""

    name = "instance-restart"
    summary = "kill -9 a prefill instance mid-replay, start it again under its name; no " \
              "predicted prefix hit may be missed after"
    victim = "prefill-0"
    victim_returns = True

    async def fault(self) -> None:
        assert self.cluster is not None
        await asyncio.to_thread(self.cluster.kill, self.victim)

    def restart(self) -> str:
        assert self.cluster is not None
        self.cluster.start_instance(self.victim)
        return f"{self.victim} was dropped, started again and registered"


def _predicted_hits(endpoint: str) -> tuple[float, float]:
    """The Conductor's predicted prefix tokens, found and missed."""
    counts = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^kvcake_conductor_predicted_hit_tokens_total\{outcome="(\w+)"\} (\S+)$',
        _metrics(endpoint), re.M)}
    return counts.get("found", 0.0), counts.get("missed", 0.0)


SERVING_SCENARIOS: tuple[type[ServingScenario], ...] = (DecodeKill, PrefillKill,
                                                        ConductorRestart, InstanceRestart)
