"""``kvcake chaos``: each scenario in a driver process of its own, bounded in time.

A scenario that needs hosts gets a network-namespace pair made here (198.18.0.0/15) and
deleted here, also when its driver fails; its driver runs inside namespace ``a``. A driver
still running at its deadline gets SIGTERM (it stops its own children), then SIGKILL, and
the row counts one hang.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import TextIO

from kvcake.chaos.driver import RESULT_PREFIX, scenario_types
from kvcake.chaos.scenario import ChaosSettings, ScenarioResult
from kvcake.common.errors import InvalidParamsError
from kvcake.ops import NetnsPair

NETNS_TAG = "kvchaos"


def scenario_names() -> list[str]:
    return list(scenario_types())


def select(spec: str) -> list[str]:
    """``a,b,...`` (empty: all) -> scenario names, checked."""
    known = scenario_names()
    names = [n.strip() for n in spec.split(",") if n.strip()] or known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidParamsError(f"unknown chaos scenarios {unknown}; known: {known}")
    return names


def run_chaos(names: Sequence[str], settings: ChaosSettings,
              progress: TextIO | None = None) -> list[ScenarioResult]:
    results = []
    for name in names:
        if progress:
            print(f"[chaos] {name} ...", file=progress, flush=True)
        result = run_scenario(name, settings)
        if progress:
            state = f"skipped ({result.skipped})" if result.skipped else \
                "FAILED" if result.failures() else "ok"
            print(f"[chaos] {name}: {state} in {result.wall_s:.0f} s", file=progress,
                  flush=True)
        results.append(result)
    return results


def missing_needs(name: str) -> str:
    """Why scenario ``name`` cannot run on this machine ("" when it can)."""
    needs = scenario_types()[name].needs
    if "netns" in needs and (os.geteuid() != 0 or shutil.which("ip") is None):
        return "network namespaces need root and iproute2"
    if "etcd" in needs and shutil.which("etcd") is None:
        return "no etcd server binary (Debian: etcd-server)"
    return ""


def run_scenario(name: str, settings: ChaosSettings) -> ScenarioResult:
    why = missing_needs(name)
    if why:
        return ScenarioResult(name, skipped=why)
    started = time.monotonic()
    with _hosts(name) as hosts:
        command = [sys.executable, "-m", "kvcake.chaos.driver", name,
                   "--seed", str(settings.seed)]
        command += ["--quick"] if settings.quick else []
        if hosts is not None:
            command = [*hosts.prefix("a"), *command, "--netns-pid", str(os.getpid()),
                       "--netns-tag", NETNS_TAG]
        result = _drive(name, command, settings.seconds(150.0, 300.0))
    result.wall_s = round(time.monotonic() - started, 1)
    return result


@contextlib.contextmanager
def _hosts(name: str) -> Iterator[NetnsPair | None]:
    if "netns" not in scenario_types()[name].needs:
        yield None
        return
    with NetnsPair(NETNS_TAG) as pair:
        yield pair


def _drive(name: str, command: list[str], deadline_s: float) -> ScenarioResult:
    with tempfile.TemporaryFile() as log:
        driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            out, _ = driver.communicate(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            _end(driver)
            return ScenarioResult(name, hangs=1,
                                  integrity=f"driver still running after {deadline_s:.0f} s")
        except BaseException:  # interrupted (Ctrl-C, a test's timeout): leave no driver behind
            _end(driver)
            raise
        log.seek(0)
        tail = log.read().decode(errors="replace").strip()[-1500:]
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith(RESULT_PREFIX)), None)
    if line is None:
        return ScenarioResult(name, integrity=f"driver failed (exit {driver.returncode}): "
                                              f"{tail}")
    return _parse(line.removeprefix(RESULT_PREFIX))


def _end(driver: subprocess.Popen[str]) -> None:
    driver.terminate()
    try:
        driver.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        driver.kill()
        driver.communicate()


def _parse(text: str) -> ScenarioResult:
    import json

    return ScenarioResult(**json.loads(text))
