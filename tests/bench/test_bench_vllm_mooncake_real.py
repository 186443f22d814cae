"""``kvcake bench vllm``'s mooncake-real row, without vLLM: the table with and without its
column, the row left out (with one line saying how to install it) where the real wheel is
missing, and the settings vLLM's connector is given for the real Mooncake; each hit paired with
its prompt's local hit right after it; the reader loading while the writer works, and timed only
after it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from kvcake.bench import vllm_bench
from kvcake.bench.vllm_bench import Prompts, Timings, table
from kvcake.bench.vllm_instance import mooncake_transfer
from kvcake.bench.vllm_mooncake import INSTALL_HINT, missing_real_mooncake

TTFT = {"cold": 2.0, "local": 0.1, "kvcake": 0.4, "mooncake": 0.5, "mooncake-real": 0.6,
        "example": 0.8}


def rows(*connectors: str) -> list[dict[str, Any]]:
    return [{"connector": c, "prompt_len": 2048, "ttft_s": TTFT[c], "tokens_equal": True}
            for c in connectors]


def test_the_table_shows_the_real_column_and_its_ratio_to_the_drop_in() -> None:
    text = table(rows(*TTFT))
    header, line, footer = text.splitlines()
    assert header.split() == ["prompt", "cold", "local", "kvcake", "mooncake", "mooncake-real",
                              "example", "kvcake/local", "cold/kvcake", "mooncake/kvcake",
                              "example/kvcake", "mooncake-real/mooncake", "tokens", "equal"]
    assert line.split() == ["2048", "2.000s", "0.100s", "0.400s", "0.500s", "0.600s", "0.800s",
                            "4.00", "5.0", "1.25", "2.00", "1.20", "yes"]
    assert footer == ("TTFT, median; kvcake, mooncake, mooncake-real, example: a second "
                      "process loading what the first one saved")


def test_without_the_real_row_the_table_has_neither_its_column_nor_its_ratio() -> None:
    text = table(rows("cold", "local", "kvcake", "mooncake", "example"))
    assert "mooncake-real" not in text
    header, line, _ = text.splitlines()
    assert header.split()[1:6] == ["cold", "local", "kvcake", "mooncake", "example"]
    assert line.split()[-5:] == ["4.00", "5.0", "1.25", "2.00", "yes"]


def test_columns_line_up_under_their_headers() -> None:
    header, line, _ = table(rows(*TTFT)).splitlines()
    for name, value in (("mooncake-real", "0.600s"), ("mooncake-real/mooncake", "1.20")):
        assert header.index(name) + len(name) == line.index(value) + len(value)


def fake_measurements(prompts: Prompts, timings: Timings, names: tuple[str, ...]) -> None:
    for length, group in prompts.items():
        for name in names:
            timings[(name, length)] = [(TTFT[name], [1, 2]) for _ in group]


@pytest.mark.parametrize("as_json", [True, False])
def test_the_real_row_is_left_out_with_one_line_when_the_wheel_is_missing(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        as_json: bool) -> None:
    def plain(_python: Path, prompts: Prompts, timings: Timings) -> None:
        fake_measurements(prompts, timings, ("cold", "local"))

    def one(name: str) -> Any:
        return lambda _python, prompts, timings: fake_measurements(prompts, timings, (name,))

    def real(*_args: Any) -> None:
        raise AssertionError("the real row ran without the wheel")

    monkeypatch.setattr(vllm_bench, "_plain", plain)
    for name in ("kvcake", "mooncake", "example"):
        monkeypatch.setattr(vllm_bench, f"_through_{name}", one(name))
    monkeypatch.setattr(vllm_bench, "_through_mooncake_real", real)
    monkeypatch.setattr(vllm_bench, "missing_real_mooncake", lambda _python: INSTALL_HINT)
    assert vllm_bench.run_vllm_bench(True, as_json, sys.executable, [256]) == 0
    out, err = capsys.readouterr()
    assert err.strip() == INSTALL_HINT and "make vllm-mooncake" in err
    assert "mooncake-real" not in out
    if as_json:
        got = [json.loads(line)["connector"] for line in out.splitlines()]
        assert got == ["cold", "local", "kvcake", "mooncake", "example"]


def test_a_venv_without_the_real_wheel_is_told_how_to_install_it(tmp_path: Path) -> None:
    python = tmp_path / "python"  # a venv whose python cannot import mooncake.store
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    assert missing_real_mooncake(python) == INSTALL_HINT


def test_the_real_wheel_is_given_the_namespace_address_and_no_drop_in(tmp_path: Path) -> None:
    transfer, env = mooncake_transfer("198.18.0.1:50051", tmp_path, host="198.18.0.1",
                                      drop_in=False)
    assert transfer["kv_connector"] == "MooncakeStoreConnector"
    assert "PYTHONPATH" not in env
    assert env["VLLM_HOST_IP"] == env["MOONCAKE_REQUESTER_LOCAL_HOSTNAME"] == "198.18.0.1"
    settings = json.loads(Path(env["MOONCAKE_CONFIG_PATH"]).read_text())
    assert settings == {"metadata_server": "P2PHANDSHAKE",
                        "master_server_address": "198.18.0.1:50051", "protocol": "tcp",
                        "device_name": "", "mode": "standalone-store",
                        "global_segment_size": 0, "local_buffer_size": "64MB"}


def test_the_drop_in_row_keeps_its_settings(tmp_path: Path) -> None:
    _, env = mooncake_transfer("127.0.0.1:5000", tmp_path)
    assert env["PYTHONPATH"].endswith("shims/mooncake")
    assert env["MOONCAKE_REQUESTER_LOCAL_HOSTNAME"] == "127.0.0.1"
    assert "VLLM_HOST_IP" not in env


def test_each_hit_is_paired_with_its_prompts_local_hit_right_after() -> None:
    """Rows minutes apart carry the machine's drift; a hit over the same prompt's local hit
    in the same process does not."""
    timings: Timings = {("cold", 8): [(2.0, [1]), (2.0, [1])],
                        ("kvcake", 8): [(0.12, [1]), (0.3, [1])],
                        ("kvcake again", 8): [(0.1, []), (0.2, [])]}
    rows = vllm_bench._rows({8: [[0], [0]]}, timings)
    cold, kvcake = rows
    assert "vs_again" not in cold
    assert (kvcake["vs_again"], kvcake["again_ttft_s"], kvcake["tokens_equal"]) == (1.35, 0.15,
                                                                                    True)
    assert table(rows).splitlines()[-1].endswith("(median of the pairs): kvcake 1.35 at 8")


class _Recorded:
    """A stand-in for a vLLM process that writes down what is asked of it, and when."""

    log: list[str] = []
    made = 0

    def __init__(self, *args: Any) -> None:
        _Recorded.made += 1
        self.name = "writer" if _Recorded.made == 2 else "reader"
        self.log.append(f"start {self.name}")

    def ready(self) -> bool:
        return True

    def generate(self, prompt: list[int], max_tokens: int = 4) -> tuple[list[int], float]:
        self.log.append(f"{self.name} {len(prompt)}")
        return [1], 0.1

    def stop(self) -> str:
        self.log.append(f"stop {self.name}")
        return ""


def test_the_reader_loads_beside_the_writer_and_answers_only_after_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting a vLLM process is most of the bench's time: the reader starts with the writer,
    but nothing is asked of it before the writer stopped and the store settled."""
    _Recorded.log, _Recorded.made = [], 0
    monkeypatch.setattr(vllm_bench, "VllmInstance", _Recorded)
    timings: Timings = {}
    vllm_bench._write_then_read(Path(sys.executable), {}, {256: [[0] * 256]}, timings, "kvcake",
                                settle=lambda: _Recorded.log.append("settled"))
    log = _Recorded.log
    assert log[:2] == ["start reader", "start writer"]
    assert log.index("settled") > log.index("stop writer") > log.index("writer 256")
    reader_asked = [i for i, line in enumerate(log) if line.startswith("reader ")]
    assert reader_asked and min(reader_asked) > log.index("settled")
    assert len(timings[("kvcake", 256)]) == len(timings[("kvcake again", 256)]) == 1
