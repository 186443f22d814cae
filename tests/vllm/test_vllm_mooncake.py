"""vLLM's own ``MooncakeStoreConnector``, unmodified, on kvcake's store through the drop-in
``mooncake.store`` (``shims/mooncake``): real vLLM processes, a real master (and node), SmolLM2.

- ``standalone-store``: a ``kvcake node`` owns the pool and vLLM contributes none; a second
  instance loads what the first one saved, after the first has gone.
- ``embedded``: each vLLM process contributes a segment of its own memory; a second instance
  loads from the first one's segment while the first still runs.

Either way the second instance answers with the first one's tokens, vLLM counts every full
block of its prompts as cached (found through the connector: the process is new), the master
counts the reads and no load fails."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kvcake.bench.vllm_bench import wait_stored
from kvcake.bench.vllm_instance import VllmInstance, mooncake_transfer
from kvcake.ops import start_master, start_node
from vllm_venv import BLOCK, VLLM_PYTHON, needs_vllm, prompt

pytestmark = needs_vllm

PROMPTS = [prompt(11, 520), prompt(12, 300)]
BLOCKS = sum(len(p) // BLOCK for p in PROMPTS)


def _metrics(endpoint: str) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    return {name: int(float(value)) for name, _, value in
            (line.rpartition(" ") for line in lines if line and not line.startswith("#"))}


def _reads(endpoint: str) -> int:
    return sum(n for name, n in _metrics(endpoint).items()
               if name.startswith("kvcake_store_requests_total") and "Get" in name)


@contextmanager
def _running(master: str, folder: Path, mode: str) -> Iterator[VllmInstance]:
    transfer, env = mooncake_transfer(master, folder, mode)
    instance = VllmInstance(VLLM_PYTHON, transfer, env)
    try:
        assert instance.ready(), instance.stop()[-3000:]
        yield instance
    finally:
        log = instance.stop()
    assert "Traceback" not in log and "Failed to get" not in log, log[-3000:]


def _loads_every_block(instance: VllmInstance, cold: list[list[int]]) -> None:
    for ids, tokens in zip(PROMPTS, cold, strict=True):
        answer = instance.ask({"prompt": ids, "max_tokens": 4})
        assert answer["tokens"] == tokens
        assert answer["cached"] == len(ids) // BLOCK * BLOCK


@pytest.mark.timeout(600)  # two vLLM processes, one after the other
def test_standalone_store_a_second_instance_loads_what_the_first_saved(
        tmp_path: Path) -> None:
    master, endpoint = start_master()
    node = start_node(endpoint, "256MiB")
    metrics = master.endpoints["metrics"]
    try:
        with _running(endpoint, tmp_path, "standalone-store") as first:
            cold = [first.generate(p)[0] for p in PROMPTS]
            wait_stored(metrics, BLOCKS)  # saves go on after the step
        reads = _reads(metrics)
        with _running(endpoint, tmp_path, "standalone-store") as second:
            _loads_every_block(second, cold)
        assert _reads(metrics) > reads  # its blocks came from the node's pool
    finally:
        node.stop()
        master.stop()


@pytest.mark.timeout(600)
def test_embedded_a_second_instance_loads_from_the_first_ones_segment(tmp_path: Path) -> None:
    master, endpoint = start_master()  # no node: the pool is the instances' own memory
    metrics = master.endpoints["metrics"]
    try:
        with _running(endpoint, tmp_path, "embedded") as first:
            cold = [first.generate(p)[0] for p in PROMPTS]
            wait_stored(metrics, BLOCKS)
            reads = _reads(metrics)
            with _running(endpoint, tmp_path, "embedded") as second:
                _loads_every_block(second, cold)
            assert _reads(metrics) > reads
    finally:
        master.stop()
