"""The fault-injection suite: its bookkeeping by hand, then the short form of ``kvcake
chaos`` on real processes (store scenarios, namespaces, SmolLM2 workers)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import pytest

from kvcake.chaos import runner
from kvcake.chaos.ledger import Ledger
from kvcake.chaos.report import print_table, verdict
from kvcake.chaos.runner import run_chaos, select
from kvcake.chaos.scenario import ChaosSettings, ScenarioResult
from kvcake.chaos.values import is_exact, make_value, value_digest
from kvcake.cli import main
from kvcake.common.errors import InvalidParamsError

QUICK = ChaosSettings(seed=7, quick=True)


def test_a_value_proves_its_bytes_exact() -> None:
    value = make_value("k", 1000, random.Random(1))
    digest = value_digest(value)
    assert len(value) == 1000 and is_exact("k", value, digest)
    flipped = bytearray(value)
    flipped[500] ^= 1
    assert not is_exact("k", flipped, digest)
    assert not is_exact("k", value[:-1], digest)
    assert not is_exact("other", value, None)  # another object's bytes
    assert not is_exact("k", make_value("k", 1000, random.Random(2)), digest)  # not the one written
    assert not is_exact("k", b"", None)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _op(ledger: Ledger, clock: Clock, kind: str, result: str, start: float, end: float) -> None:
    clock.now = end
    ledger.record(kind, result, start)


def test_recovery_runs_to_the_first_success_after_the_last_failure() -> None:
    clock = Clock()
    ledger = Ledger(clock)
    _op(ledger, clock, "put", "ok", 0.5, 0.6)          # before the fault: not counted
    _op(ledger, clock, "put", "ok", 1.0, 1.1)          # a lucky success
    _op(ledger, clock, "put", "TRANSFER_FAIL", 1.2, 3.0)
    _op(ledger, clock, "put", "ok", 2.9, 3.2)          # started before the last failure ended
    _op(ledger, clock, "put", "ok", 3.3, 3.5)          # recovered here
    _op(ledger, clock, "get", "not_found", 1.5, 1.6)   # tolerated
    _op(ledger, clock, "get", "ok", 1.7, 1.8)
    assert ledger.recovery_s(1.0, frozenset({"ok", "not_found"})) == pytest.approx(2.5)
    assert ledger.recovery_s(1.0) == pytest.approx(2.5)  # get recovered at 1.8
    assert ledger.errors() == {"get:not_found": 1, "put:TRANSFER_FAIL": 1}
    _op(ledger, clock, "get", "RPC_FAIL", 4.0, 4.5)   # failing at the end: never recovered
    assert ledger.recovery_s(1.0) is None


def test_the_verdict_names_every_must_be_zero_column(capsys: pytest.CaptureFixture[str]) -> None:
    results = [ScenarioResult("a", 10, {"get:not_found": 2}, recover_s=1.234),
               ScenarioResult("b", 5, wrong_bytes=1, lost_objects=2, hangs=3,
                              integrity="KV blocks held"),
               ScenarioResult("c", skipped="needs root")]
    assert verdict(results) == ["b: wrong bytes 1", "b: lost objects 2", "b: hangs 3",
                                "b: integrity: KV blocks held"]
    print_table(results, sys.stdout)
    out = capsys.readouterr().out
    assert out.splitlines()[1].split() == ["a", "10", "get:not_found", "2", "0", "0", "0",
                                           "1.23", "ok"]


def test_an_interrupted_run_leaves_no_driver_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test's timeout or Ctrl-C while a scenario runs ends its driver (and so its cluster)."""
    drivers: list[subprocess.Popen[str]] = []
    real_communicate = subprocess.Popen.communicate

    def interrupted(self: subprocess.Popen[str], *args: object, **kwargs: object) -> object:
        if not drivers:
            drivers.append(self)
            raise KeyboardInterrupt
        return real_communicate(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(subprocess.Popen, "communicate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner._drive("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], 60.0)
    assert drivers[0].poll() is not None  # ended, not orphaned


def test_unknown_scenarios_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InvalidParamsError, match="unknown chaos scenarios"):
        select("node-kill,nope")
    assert main(["chaos", "--scenarios", "nope"]) == 2
    assert "known: [" in capsys.readouterr().err


def _assert_clean(results: list[ScenarioResult]) -> None:
    assert verdict(results) == [], results
    for result in results:
        assert result.operations > 0 and result.recover_s is not None, result


@pytest.mark.timeout(200)
def test_quick_store_scenarios_lose_nothing() -> None:
    results = run_chaos(["node-kill", "node-kill-shm", "pool-fill"], QUICK)
    _assert_clean(results)
    kill, kill_shm, fill = results
    # the master holds the same-host nodes' pidfds: it drops the dead one before the next
    # call, so puts go on to the survivor instead of failing until the client TTL
    assert kill.checked > 0 and kill_shm.checked > 0
    assert fill.errors.get("check:not_found", 0) > 0  # the flood evicted something


@pytest.mark.netns
@pytest.mark.timeout(120)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="network namespaces need root and iproute2 (CI runs as root)")
def test_quick_network_cut_loses_nothing_and_leaves_no_namespace() -> None:
    _assert_clean(run_chaos(["net-cut"], QUICK))
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=True).stdout
    assert f"kvchaos-a{os.getpid()}" not in listed and f"kvchaos-b{os.getpid()}" not in listed


@pytest.mark.timeout(330)
def test_quick_serving_scenarios_end_every_request() -> None:
    results = run_chaos(["decode-kill", "prefill-kill", "conductor-restart",
                         "instance-restart"], QUICK)
    _assert_clean(results)
    for result in results:
        assert result.integrity == "ok"  # every surviving instance's KV blocks are free
        # a request on the killed instance is told to come back (503), never a 502
        assert not [kind for kind in result.errors if kind.endswith("http_502")], result.errors
    # after a new Conductor, and after a prefill instance came back empty, the index
    # predicted only hits that were there
    for restart in results[-2:]:
        assert any(note.startswith("after the restart") and note.endswith(", 0 missed")
                   for note in restart.notes), restart.notes


@pytest.mark.etcd
@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("etcd") is None, reason="needs the etcd server binary")
def test_quick_leader_kill_loses_no_acknowledged_object() -> None:
    [result] = run_chaos(["leader-kill"], QUICK)
    _assert_clean([result])
    assert result.checked > 0 and any("restored" in note for note in result.notes)
