"""``kvcake bench handoff``: a prefill's KV handed to a decode instance, after each step or
layer by layer.

A prefill instance writes the blocks each step completes into the decode instance's
reserved blocks. Over the network those writes run on the transfer engine's I/O thread, so
they can start as soon as each layer's K/V exist and overlap the rest of the step; after the
step, in one piece, the last step's writes are a tail the first token waits for::

    after the step   | layer 0 .. layer 29 |============ writes ============|  ready
    layer by layer   | layer 0 .. layer 29 |=|  ready      (writes ran beside the layers)

The decode side is a separate process that owns a segment laid out as this engine's cache
(``kvcake transfer serve``); this process runs the engine. Each prompt is fresh random
tokens (no prefix cache hit), the modes take turns, and every prompt's blocks are checked
to have landed byte for byte. Same-host (``shm``) writes are copies in the engine thread,
which overlap nothing: that row is the reference, sent after the step.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import msgspec

from kvcake.bench.measure import print_rows
from kvcake.common.config import MiB
from kvcake.common.errors import KvcakeError
from kvcake.engine.config import EngineConfig
from kvcake.engine.core import EngineCore
from kvcake.engine.kv import KVSender
from kvcake.engine.scheduler import SchedulerOutput
from kvcake.transfer import RemoteSegment, TransferEngine
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.peer import PeerProcess
from kvcake.wire.kv import KVRegion
from kvcake.wire.sampling import SamplingParams
from kvcake.worker.loop import PrefillSender

MODES = (("tcp", "step"), ("tcp", "layer"), ("shm", "step"))
FIRST = SamplingParams(max_tokens=1, temperature=0.0)
COLUMNS = (("transport", "transport"), ("mode", "sent"), ("prompt_len", "prompt"),
           ("ready_s", "ready s"), ("tail_ms", "tail ms"), ("mib", "MiB"))


@dataclass(frozen=True)
class HandoffPlan:
    lengths: tuple[int, ...]
    repeats: int


def plan_for(quick: bool, lengths: Sequence[int] | None = None) -> HandoffPlan:
    return HandoffPlan(tuple(lengths or ((1024,) if quick else (1024, 4096))),
                       3 if quick else 5)


@dataclass
class _Prefill:
    """One engine and the sender it hands its KV over with, on one transport."""

    core: EngineCore
    sender: KVSender
    hook: _Recorder
    target: KVRegion
    remote: RemoteSegment


def _prefill(transport: str, config: EngineConfig, peer: PeerProcess,
             stack: ExitStack) -> _Prefill:
    engine = stack.enter_context(TransferEngine(TransferConfig(transport=transport)))
    core = EngineCore(config, transfer=engine)
    stack.callback(core.close)
    assert core.kv_region is not None and core.kv_segment is not None
    sender = KVSender(engine, core.kv_region, core.kv_segment.view)
    hook = _Recorder(sender, config.block_size)
    core.step_hook = hook
    remote = engine.open_segment(peer.segment)
    target = msgspec.structs.replace(core.kv_region, descriptor=remote.descriptor)
    return _Prefill(core, sender, hook, target, remote)


@contextmanager
def _prefills(plan: HandoffPlan) -> Iterator[dict[str, _Prefill]]:
    """An engine per transport writing into one decode-side segment of the same layout."""
    longest = max(plan.lengths) + 16
    config = EngineConfig(max_model_len=longest, kv_cache_bytes=256 * MiB)
    with ExitStack() as stack:  # the engines' caches take at most kv_cache_bytes each
        peer = stack.enter_context(PeerProcess("handoff-decode", config.kv_cache_bytes))
        yield {transport: _prefill(transport, config, peer, stack)
               for transport in sorted({t for t, _ in MODES})}


def _handoff(prefill: _Prefill, by_layer: bool, prompt: list[int], tag: str
             ) -> dict[str, float]:
    """Prefill ``prompt`` into blocks ``0..n`` of the decode side; seconds until its KV has
    landed there, and of those the wait after the last step."""
    core, sender = prefill.core, prefill.sender
    prefill.hook.by_layer = by_layer
    blocks = -(-len(prompt) // core.config.block_size)
    sender.open(tag, sender.target(prefill.target, list(range(blocks))))
    start = time.perf_counter()
    core.add_request(tag, prompt, FIRST)
    while core.has_unfinished():
        core.step()
    stepped = time.perf_counter()
    moved, _ = sender.wait(tag, 60.0)
    ready = time.perf_counter()
    return {"ready_s": ready - start, "tail_ms": (ready - stepped) * 1e3, "mib": moved / MiB}


class _Recorder(PrefillSender):
    """The sender's hook, also noting each request's local blocks (for the check)."""

    def __init__(self, sender: KVSender, block_size: int) -> None:
        super().__init__(sender, block_size)
        self.block_ids: dict[str, list[int]] = {}

    def before_execute(self, output: SchedulerOutput) -> None:
        super().before_execute(output)
        for chunk in output.chunks:
            self.block_ids[chunk.request.request_id] = list(chunk.request.block_ids)


def _check_landed(prefill: _Prefill, mapped: _Prefill, tag: str) -> None:
    """Every block of ``tag``'s prompt is on the decode side byte for byte (read through
    ``mapped``'s same-host mapping of that segment)."""
    local = prefill.core.kv_segment
    engine = mapped.core.transfer
    assert local is not None and engine is not None and prefill.core.kv_region is not None
    for dst, src in enumerate(prefill.hook.block_ids.pop(tag)):
        pairs = zip(prefill.core.kv_region.block_ranges(src, 1),
                    prefill.target.block_ranges(dst, 1), strict=True)
        for (ours, length), (theirs, _) in pairs:
            there = engine.map_range(mapped.remote, theirs, length)
            if there is None or there.view != local.view[ours:ours + length]:
                raise KvcakeError(f"{tag}: block {src} did not land as decode block {dst}")


def measure(plan: HandoffPlan, log: Any = None) -> list[dict[str, Any]]:
    rng = random.Random(20261207)
    samples: list[dict[str, Any]] = []
    with _prefills(plan) as prefills:
        warm = min(64, *plan.lengths)
        for transport, mode in MODES:  # warm connections, mappings and the model
            tag = f"w-{transport}-{mode}"
            _handoff(prefills[transport], mode == "layer", _prompt(rng, warm), tag)
            _check_landed(prefills[transport], prefills["shm"], tag)
        for repeat in range(plan.repeats):
            for length in plan.lengths:
                if log is not None:
                    print(f"  prompt {length} tokens, repeat {repeat + 1}", file=log)
                for transport, mode in MODES:
                    tag = f"{transport}-{mode}-{length}-{repeat}"
                    timing = _handoff(prefills[transport], mode == "layer",
                                      _prompt(rng, length), tag)
                    _check_landed(prefills[transport], prefills["shm"], tag)
                    samples.append({"transport": transport, "mode": mode,
                                    "prompt_len": length, **timing})
    return samples


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(length)]


def summarise(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (transport, mode, length)."""
    rows = []
    for length in sorted({s["prompt_len"] for s in samples}):
        for transport, mode in MODES:
            mine = [s for s in samples if (s["transport"], s["mode"], s["prompt_len"])
                    == (transport, mode, length)]
            rows.append({"transport": transport, "mode": mode, "prompt_len": length,
                         **{key: statistics.median(s[key] for s in mine)
                            for key in ("ready_s", "tail_ms", "mib")}})
    return rows


def ratios(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per length: the median over repeats of step/layer time to ready over tcp (each pair
    measured back to back)."""
    out = []
    for length in sorted({s["prompt_len"] for s in samples}):
        step = [s for s in samples if (s["transport"], s["mode"], s["prompt_len"])
                == ("tcp", "step", length)]
        layer = [s for s in samples if (s["transport"], s["mode"], s["prompt_len"])
                 == ("tcp", "layer", length)]
        paired = [a["ready_s"] / b["ready_s"] for a, b in zip(step, layer, strict=True)]
        out.append({"prompt_len": length, "ratio": "tcp ready step/layer",
                    "value": statistics.median(paired)})
    return out


def run_handoff_bench(quick: bool, as_json: bool, lengths: Sequence[int] | None = None) -> int:
    plan = plan_for(quick, lengths)
    try:
        samples = measure(plan, None if as_json else sys.stderr)
    except KvcakeError as exc:
        print(f"kvcake bench handoff: {exc}", file=sys.stderr)
        return 1
    rows, paired = summarise(samples), ratios(samples)
    if as_json:
        print_rows(samples, [], True)
        print_rows(paired, [], True)
        return 0
    print(f"prefill -> decode KV handoff, SmolLM2-135M {EngineConfig().dtype} (medians of "
          f"{plan.repeats}): prompt computed and its KV landed on the decode side")
    print_rows(rows, COLUMNS, False)
    for row in paired:
        print(f"{row['prompt_len']} tokens: tcp, after the step / layer by layer, time to "
              f"ready: {row['value']:.3f}x (median of paired runs)")
    return 0
