"""The master leader killed under load: two masters campaign in a loopback etcd, nodes and
the client know only ``etcd://``; kill -9 the leader, and the standby must take over with
every acknowledged object that still has a live replica. A fresh standby then joins."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kvcake.chaos.scenario import ChaosSettings, ScenarioResult
from kvcake.chaos.scenarios import StoreScenario, kill_9
from kvcake.common.errors import KvcakeError
from kvcake.ops import NetnsPair, ServerProcess, kvcake_command, start_etcd

HA_FLAGS = ("--leader-ttl", "2", "--put-fence", "0.5", "--client-ttl", "4",
            "--lease-ttl", "2", "--put-timeout", "5", "--summary-interval", "0",
            "--metrics-port", "-1")


class LeaderKill(StoreScenario):
    name = "leader-kill"
    summary = "kill -9 the store's master leader (HA on etcd); the standby takes over"
    needs = ("etcd",)
    window_s = (4.0, 6.0)
    settle_s = (3.0, 6.0)

    def __init__(self, settings: ChaosSettings, hosts: NetnsPair | None = None) -> None:
        super().__init__(settings, hosts)
        self._data = tempfile.TemporaryDirectory(prefix="kvcake-chaos-etcd-")
        self.masters: list[ServerProcess] = []

    def start(self) -> None:
        etcd, endpoint = start_etcd(Path(self._data.name) / "etcd")
        self.processes.append(etcd)
        self.master = f"etcd://{endpoint}/chaos-{self.settings.seed}/"
        first = self.start_master()
        _wait_until(lambda: "as leader" in first.output())
        self.start_master()
        for _ in range(self.num_nodes()):
            self.start_node()

    def start_master(self) -> ServerProcess:
        process = ServerProcess(kvcake_command("master", "--port", "0", "--etcd", self.master,
                                               *HA_FLAGS), r"standby", name="kvcake master")
        self.processes.append(process)
        self.masters.append(process)
        return process

    def leader(self) -> ServerProcess:
        live = [p for p in self.masters if p.alive() and "as leader" in p.output()]
        assert live, "no master leads"
        return live[-1]

    async def fault(self) -> None:
        self.victim = self.leader()
        kill_9(self.victim)

    async def repair(self) -> None:
        await asyncio.to_thread(self.start_master)  # a fresh standby joins the campaign

    async def check(self, fault_at: float) -> ScenarioResult:
        try:
            text = self.leader().output()
            self.notes.append(text[text.rindex("as leader"):].split(")")[0] + ")")
        except (AssertionError, ValueError, KvcakeError):
            self.notes.append("no new leader")
        return await super().check(fault_at)

    def stop_processes(self) -> None:
        super().stop_processes()
        self._data.cleanup()


def _wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise KvcakeError("the first master did not become leader")
        time.sleep(0.05)


LEADER_SCENARIOS: tuple[type[StoreScenario], ...] = (LeaderKill,)
