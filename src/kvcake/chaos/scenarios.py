"""The store's faults: a storage node killed, the pool flooded, a node cut off the network.

Each is a master and storage nodes in their own processes (``kvcake master``/``kvcake
node``) under the steady put/get workload of :mod:`kvcake.chaos.workload`, and each ends
with the same checks: every acknowledged object read back (exact bytes, or gone only where
no surviving replica held it), the master's ``CheckIntegrity``, and after ``remove_all``
no byte still allocated.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal

from kvcake.chaos.ledger import HANG, NOT_FOUND, OK
from kvcake.chaos.scenario import ChaosSettings, Scenario, ScenarioResult
from kvcake.chaos.workload import StoreWorkload, WorkloadConfig, client_configs, integrity
from kvcake.common.errors import KvcakeError
from kvcake.ops import NetnsPair, ServerProcess, start_master, start_node
from kvcake.store import AsyncStore

# short liveness, so a dead node is noticed within the scenario
MASTER_FLAGS = ("--client-ttl", "3", "--lease-ttl", "2", "--put-timeout", "5",
                "--summary-interval", "0", "--metrics-port", "-1")


class StoreScenario(Scenario):
    host = "127.0.0.1"
    node_size = "96MiB"
    transport = "auto"

    def __init__(self, settings: ChaosSettings, hosts: NetnsPair | None = None) -> None:
        super().__init__(settings, hosts)
        self.master = ""
        self.nodes: dict[str, ServerProcess] = {}  # segment name -> node
        self.store: AsyncStore | None = None
        self.workload: StoreWorkload | None = None

    def workload_config(self) -> WorkloadConfig:
        return WorkloadConfig(self.settings.seed, self.name)

    # ----- processes
    def start(self) -> None:
        process, self.master = start_master("--host", self.host, *MASTER_FLAGS,
                                            *self.master_flags())
        self.processes.append(process)
        for _ in range(self.num_nodes()):
            self.start_node()

    def master_flags(self) -> tuple[str, ...]:
        return ()

    def num_nodes(self) -> int:
        return 2

    def start_node(self, host: str = "", prefix: tuple[str, ...] = ()) -> str:
        process = start_node(self.master, self.node_size, "--host", host or self.host,
                             prefix=prefix)
        self.processes.append(process)
        self.nodes[process.endpoints["segment"]] = process
        return process.endpoints["segment"]

    # ----- workload
    async def open(self) -> None:
        self.store = AsyncStore(*client_configs(self.master, self.host, self.transport))
        await self.store.setup()
        self.workload = StoreWorkload(self.store, self.workload_config(), self.ledger)

    async def load(self, stop: asyncio.Event) -> None:
        assert self.workload is not None
        await self.workload.run(stop)

    async def close(self) -> None:
        if self.store is not None:
            with contextlib.suppress(KvcakeError, TimeoutError):
                await asyncio.wait_for(self.store.close(), 10)
            self.store = None

    # ----- checks
    def surviving(self) -> set[str]:
        """Segments whose objects must all read back (default: every live node's)."""
        return {name for name, process in self.nodes.items() if process.alive()}

    def tolerated(self) -> frozenset[str]:
        """Results that are no failure for recovery: a not-found may be an object that is
        rightly gone (its only replica died, or it was evicted)."""
        return frozenset({OK, NOT_FOUND})

    async def check(self, fault_at: float) -> ScenarioResult:
        assert self.store is not None and self.workload is not None
        recover = self.ledger.recovery_s(fault_at, self.tolerated())
        stats = await self.store.stats()
        if stats.evicted and self.name != "pool-fill":
            self.notes.append(f"{stats.evicted} evicted")  # would blur "lost"
        verdict = await self.workload.verify(self.surviving())
        errors = self.ledger.errors()
        errors.update({f"check:{k}": v for k, v in verdict.results.items() if k != "ok"})
        return ScenarioResult(
            self.name, self.ledger.num_operations, errors,
            wrong_bytes=self.ledger.count("wrong_bytes") + verdict.wrong_bytes,
            lost_objects=len(verdict.lost), hangs=self.ledger.count(HANG)
            + verdict.results.get(HANG, 0), recover_s=_round(recover),
            integrity=await self._integrity(), checked=verdict.checked,
            notes=[f"lost e.g. {verdict.lost[:3]}"] if verdict.lost else [])

    async def _integrity(self) -> str:
        """The master's checks before and after removing everything; then no byte may stay
        allocated (a leaked allocation would)."""
        assert self.store is not None
        before = await integrity(self.store)
        if before != "ok":
            return before
        await self.store.remove_all(force=True)
        stats = await self.store.stats()
        if stats.used_bytes or stats.num_keys:
            return f"after remove_all: {stats.num_keys} keys, {stats.used_bytes} bytes in use"
        return await integrity(self.store)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def kill_9(process: ServerProcess) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.kill()  # reaps it and closes its log


class NodeKill(StoreScenario):
    name = "node-kill"
    summary = "kill -9 one of two storage nodes (replica_num=2), then start a fresh one"
    transport = "tcp"

    async def fault(self) -> None:
        self.victim = sorted(self.nodes)[0]
        kill_9(self.nodes[self.victim])

    async def repair(self) -> None:
        await asyncio.to_thread(self.start_node)


class NodeKillShm(NodeKill):
    """The same kill with the client mapping both nodes' memory: a put into the dead node's
    pages must fail (its pidfd, client side and master side), never be acknowledged."""

    name = "node-kill-shm"
    summary = "kill -9 one of two storage nodes while the client writes through shm"
    transport = "shm"


class PoolFill(StoreScenario):
    """One small node; a flood of big puts drives the pool past its high watermark. The
    master must evict (gets then answer exact bytes or OBJECT_NOT_FOUND) and never touch the
    hard-pinned anchors written first."""

    name = "pool-fill"
    summary = "flood the pool past its high watermark (eviction); pinned objects stay"
    node_size = "16MiB"
    num_anchors = 8

    def num_nodes(self) -> int:
        return 1

    def workload_config(self) -> WorkloadConfig:
        return WorkloadConfig(self.settings.seed, self.name, replica_num=1, put_share=0.7,
                              min_size=4 << 10, max_size=128 << 10, track_placement=False)

    async def open(self) -> None:
        await super().open()
        assert self.workload is not None
        rng = random.Random(f"{self.settings.seed}/{self.name}/anchors")
        for i in range(self.num_anchors):
            await self.workload.put(f"{self.name}/anchor/{i}", 32 << 10, rng, pinned=True)

    async def fault(self) -> None:
        self._flood = asyncio.ensure_future(self._flood_puts())

    async def _flood_puts(self) -> None:
        assert self.workload is not None
        rng = random.Random(f"{self.settings.seed}/{self.name}/flood")
        for i in range(160):  # 160 x 256 KiB = 40 MiB into 16 MiB
            await self.workload.put(f"{self.name}/flood/{i}", 256 << 10, rng)

    async def repair(self) -> None:
        await self._flood

    def surviving(self) -> set[str]:
        return set()  # eviction may take anything but the pinned anchors



class NetCut(StoreScenario):
    """Master, client and node a in namespace a; node b in namespace b. b's veth goes down
    for a few seconds (quick: shorter than the master's client TTL, so b is only late;
    full: longer, so b is declared dead, its objects go and it rejoins empty), then up."""

    name = "net-cut"
    summary = "cut a node off the network (veth down) and bring it back"
    needs = ("netns",)
    window_s = (2.5, 5.0)
    settle_s = (4.0, 6.0)

    def __init__(self, settings: ChaosSettings, hosts: NetnsPair | None = None) -> None:
        super().__init__(settings, hosts)
        assert self.hosts is not None, "net-cut runs inside a namespace pair"
        self.host = self.hosts.address("a")
        self.cut = ""

    def start(self) -> None:
        assert self.hosts is not None
        process, self.master = start_master("--host", self.host, *MASTER_FLAGS)
        self.processes.append(process)
        self.start_node()
        self.cut = self.start_node(self.hosts.address("b"), tuple(self.hosts.prefix("b")))

    async def fault(self) -> None:
        assert self.hosts is not None
        await asyncio.to_thread(self.hosts.set_link, "b", False)

    async def repair(self) -> None:
        assert self.hosts is not None
        await asyncio.to_thread(self.hosts.set_link, "b", True)

    def surviving(self) -> set[str]:
        return super().surviving() - {self.cut}  # b's objects may be gone (declared dead)

    async def check(self, fault_at: float) -> ScenarioResult:
        assert self.store is not None
        segments = (await self.store.stats()).num_segments
        self.notes.append(f"{segments} of 2 segments mounted after the cut")
        return await super().check(fault_at)


STORE_SCENARIOS: tuple[type[StoreScenario], ...] = (NodeKill, NodeKillShm, PoolFill, NetCut)
