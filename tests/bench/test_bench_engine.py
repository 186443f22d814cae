"""The engine benchmark in its smallest form: row structure, ratios and targets, never speed."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

from kvcake.bench.engine import (
    EnginePlan,
    VllmRunner,
    bench_engine,
    check_vllm_python,
    measure,
    prompt_sets,
    report,
    run_engine_bench,
)
from kvcake.common.errors import InvalidParamsError, KvcakeError

ROW_FIELDS = {"system", "phase", "batch", "tok_per_s", "seconds", "prompt_len", "new_tokens",
              "dtype", "threads", "repeats"}


def test_tiny_run_prints_rows_ratios_and_targets(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    plan = EnginePlan(prompt_len=16, new_tokens=4, warmups=0, repeats=1, batches=(1, 2))
    assert bench_engine(plan, as_json=True) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    rows = [line for line in lines if "system" in line]
    assert {(r["system"], r["phase"], r["batch"]) for r in rows} == {
        (s, p, b) for s in ("kvcake", "hf") for p in ("prefill", "decode") for b in (1, 2)}
    for row in rows:
        assert row.keys() >= ROW_FIELDS
        assert (row["prompt_len"], row["new_tokens"], row["dtype"]) == (16, 4, "bfloat16")
        assert row["tok_per_s"] > 0 and row["repeats"] == 1
    ratios = [line for line in lines if "ratio" in line and "target" not in line]
    assert {(r["ratio"], r["phase"], r["batch"]) for r in ratios} == {
        ("kvcake/hf", p, b) for p in ("prefill", "decode") for b in (1, 2)}
    assert all(r["value"] > 0 for r in ratios)
    targets = {line["target"]: line for line in lines if "target" in line}
    assert set(targets) == {
        "decode batch 1 kvcake/vllm", "decode batch 8 kvcake/hf", "decode batch 8 kvcake/vllm",
        "decode batch 32 kvcake/hf", "decode batch 32 kvcake/vllm", "prefill batch 1 kvcake/hf",
        "prefill batch 2 kvcake/hf", "prefill batch 1 kvcake/vllm", "prefill batch 2 kvcake/vllm"}
    assert targets["decode batch 8 kvcake/hf"]["met"] is None  # batch 8 was not run
    assert targets["prefill batch 2 kvcake/vllm"]["met"] is None  # neither was vLLM
    assert isinstance(targets["prefill batch 2 kvcake/hf"]["met"], bool)


def _row(system: str, phase: str, batch: int, rate: float) -> dict[str, object]:
    return {"system": system, "phase": phase, "batch": batch, "tok_per_s": rate,
            "threads": 2}


def test_table_shows_each_system_ratios_and_verdicts(capsys: pytest.CaptureFixture[str]) -> None:
    plan = EnginePlan(prompt_len=8, new_tokens=2, warmups=0, repeats=1, batches=(8,))
    rows = [_row("kvcake", "decode", 8, 300.0), _row("hf", "decode", 8, 150.0),
            _row("vllm", "decode", 8, 400.0), _row("kvcake", "prefill", 8, 900.0),
            _row("hf", "prefill", 8, 1000.0)]
    report(rows, plan, "smollm2", as_json=False)
    out = capsys.readouterr().out
    assert "kvcake/hf" in out and "kvcake/vllm" in out and "vllm tok/s" in out
    assert "decode batch 8 kvcake/hf >= 1.5: 2.00  [met]" in out
    assert "decode batch 8 kvcake/vllm >= 1.0: 0.75  [MISSED]" in out
    assert "prefill batch 8 kvcake/hf >= 1.0: 0.90  [MISSED]" in out
    assert "decode batch 32 kvcake/vllm >= 0.8" in out  # not run: said so, not hidden


def test_vllm_without_a_python_names_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVCAKE_VLLM_PYTHON", raising=False)
    with pytest.raises(InvalidParamsError, match="--vllm-python"):
        run_engine_bench(quick=True, as_json=True, against="vllm", vllm_python=None,
                         batches=None, dtype=None)


@pytest.mark.parametrize("batches", ["", "0", "1,x", "-2"])
def test_bad_batches_are_named(batches: str) -> None:
    with pytest.raises(InvalidParamsError, match="--batches"):
        run_engine_bench(quick=True, as_json=True, against=None, vllm_python=None,
                         batches=batches or ",", dtype=None)


FAKE_VLLM = '''
import time

class SamplingParams:
    def __init__(self, max_tokens, min_tokens, temperature, ignore_eos, detokenize):
        assert min_tokens == max_tokens and temperature == 0.0 and ignore_eos
        self.max_tokens = max_tokens

class _Completion:
    def __init__(self, n):
        self.token_ids = [0] * n

class _Output:
    def __init__(self, n):
        self.outputs = [_Completion(n)]

class LLM:
    def __init__(self, model, dtype, max_model_len, max_num_seqs, enable_prefix_caching, seed):
        assert not enable_prefix_caching and max_num_seqs == 2 and max_model_len >= 8

    def generate(self, inputs, params, use_tqdm=True):
        assert all(len(i["prompt_token_ids"]) == 4 for i in inputs)
        time.sleep(0.001 * params.max_tokens)
        return [_Output(params.max_tokens) for _ in inputs]
'''


def stand_in_python(tmp_path: Path) -> Path:
    """An interpreter that finds the stand-in ``vllm`` module written into ``tmp_path`` (it
    drops ``-I``, so PYTHONPATH counts)."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\n[ "$1" = "-I" ] && shift\n'
                      f'PYTHONPATH={tmp_path} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return python


def test_vllm_driver_round_trip_with_a_stand_in(tmp_path: Path) -> None:
    """The driver script and its parsing, with a stand-in ``vllm`` module (vLLM itself is
    not installed here)."""
    (tmp_path / "vllm.py").write_text(FAKE_VLLM)
    python = stand_in_python(tmp_path)
    assert check_vllm_python(str(python)) == str(python)
    plan = EnginePlan(prompt_len=4, new_tokens=3, warmups=1, repeats=2, batches=(1, 2))
    sets = prompt_sets(plan, vocab_size=100)
    with VllmRunner.started(str(python), plan, tmp_path, threads=1) as runner:
        timings = measure([runner], plan, sets)
    assert sorted(timings) == [("vllm", 1), ("vllm", 2)]
    for (_, batch), runs in timings.items():
        assert len(runs) == 2
        for run in runs:
            assert (run.prefill_tokens, run.decode_tokens) == (batch * 4, batch * 2)
            assert run.prefill_s > 0 and run.decode_s > 0


LEAVES_AN_IPC_FILE = (
    "\nimport os as _os, tempfile as _tempfile\n"
    "_fd, _path = _tempfile.mkstemp(prefix='ipc-')  # as vLLM's IPC sockets, never removed\n"
    "with open(_os.environ['KVCAKE_TEST_MARKER'], 'w') as _marker:\n"
    "    _marker.write(_path)\n")


def test_the_vllm_drivers_temporary_files_go_with_its_run(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM leaves its IPC sockets in the temporary directory even when it exits cleanly: the
    driver runs with a TMPDIR of its own that the bench removes."""
    (tmp_path / "vllm.py").write_text(FAKE_VLLM + LEAVES_AN_IPC_FILE)
    python = stand_in_python(tmp_path)
    marker = tmp_path / "left"
    monkeypatch.setenv("KVCAKE_TEST_MARKER", str(marker))
    plan = EnginePlan(prompt_len=4, new_tokens=2, warmups=0, repeats=1, batches=(2,))
    with VllmRunner.started(str(python), plan, tmp_path, threads=1) as runner:
        measure([runner], plan, prompt_sets(plan, vocab_size=100))
    left = Path(marker.read_text())
    assert left.parent != Path(tempfile.gettempdir()), "the driver wrote to the shared /tmp"
    assert not left.exists()


def test_a_vllm_driver_that_fails_mid_run_is_an_error_with_its_last_words(
        tmp_path: Path) -> None:
    (tmp_path / "vllm.py").write_text(FAKE_VLLM.replace(
        "        assert all(", "        assert len(inputs) < 2, 'no room for two'\n"
                              "        assert all("))
    python = stand_in_python(tmp_path)
    plan = EnginePlan(prompt_len=4, new_tokens=2, warmups=0, repeats=1, batches=(1, 2))
    with pytest.raises(KvcakeError, match=r"(?s)exit code 1.*no room for two"), \
            VllmRunner.started(str(python), plan, tmp_path, threads=1) as runner:
        measure([runner], plan, prompt_sets(plan, vocab_size=100))


STOPS_READING_AFTER_ONE_BATCH = (  # its input closes before the first batch's answer
    "\nimport os as _os\n"
    "_calls = [0]\n"
    "_generate = LLM.generate\n"
    "def _closing(self, inputs, params, use_tqdm=True):\n"
    "    _calls[0] += 1\n"
    "    if _calls[0] == 2:\n"
    "        _os.close(0)\n"
    "    return _generate(self, inputs, params, use_tqdm)\n"
    "LLM.generate = _closing\n")


def test_a_vllm_driver_gone_between_turns_is_an_error_with_its_last_words(
        tmp_path: Path) -> None:
    (tmp_path / "vllm.py").write_text(FAKE_VLLM + STOPS_READING_AFTER_ONE_BATCH)
    python = stand_in_python(tmp_path)
    plan = EnginePlan(prompt_len=4, new_tokens=2, warmups=0, repeats=1, batches=(1, 2))
    with pytest.raises(KvcakeError, match=r"(?s)exit code 1.*Bad file descriptor"), \
            VllmRunner.started(str(python), plan, tmp_path, threads=1) as runner:
        measure([runner], plan, prompt_sets(plan, vocab_size=100))
