"""``kvcake bench vllm``'s mooncake-real row, without vLLM: the table with and without its
column, the row left out (with one line saying how to install it) where the real wheel is
missing, and the settings vLLM's connector is given for the real Mooncake; each hit paired with
its prompt's local hit right after it, and with kvcake's hit of the same prompt; the readers
loading while the writers work, and taking turns only after them."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from kvcake.bench import vllm_bench
from kvcake.bench.vllm_bench import Prompts, Timings, table
from kvcake.bench.vllm_instance import mooncake_transfer
from kvcake.bench.vllm_mooncake import INSTALL_HINT, RealMooncake, missing_real_mooncake
from kvcake.common.errors import KvcakeError

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
    @contextmanager
    def instance(*_args: Any) -> Iterator[None]:
        yield None

    def cold(_plain: None, prompts: Prompts, _turns: Prompts, timings: Timings) -> None:
        fake_measurements(prompts, timings, ("cold",))

    def external(_python: Path, prompts: Prompts, _turns: Prompts, timings: Timings,
                 paths: list[vllm_bench.External], _plain: None) -> None:
        fake_measurements(prompts, timings, ("local", *(path.name for path in paths)))

    @contextmanager
    def store(_blocks: int) -> Iterator[tuple[str, Any]]:
        yield "127.0.0.1:1", lambda: None

    def real(*_args: Any) -> None:
        raise AssertionError("the real row ran without the wheel")

    monkeypatch.setattr(vllm_bench, "_instance", instance)
    monkeypatch.setattr(vllm_bench, "_cold", cold)
    monkeypatch.setattr(vllm_bench, "_external", external)
    monkeypatch.setattr(vllm_bench, "_kvcake_store", store)
    monkeypatch.setattr(vllm_bench, "real_mooncake_store", real)
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


def test_a_next_turn_is_shown_for_every_path_with_kvcake_over_local() -> None:
    timings: Timings = {("cold", 256): [(2.0, [1])] * 2,
                        ("local next", 256): [(0.4, [7]), (0.6, [8])],
                        ("kvcake next", 256): [(0.2, [7]), (0.2, [8])],
                        ("mooncake next", 256): [(0.5, [7]), (0.5, [9])]}
    rows = {r["connector"]: r for r in vllm_bench._rows({256: [[0], [0]]}, timings)}
    assert set(rows) == {"cold"} and "next_ttft_s" not in rows["cold"]  # no hits timed
    timings.update({(name, 256): [(0.3, [1])] * 2 for name in ("local", "kvcake", "mooncake")})
    rows = {r["connector"]: r for r in vllm_bench._rows({256: [[0], [0]]}, timings)}
    assert (rows["kvcake"]["next_ttft_s"], rows["kvcake"]["next_vs_local"]) == (0.2, 0.417)
    assert rows["kvcake"]["next_tokens_equal"] and not rows["mooncake"]["next_tokens_equal"]
    assert "next_vs_local" not in rows["mooncake"]
    assert table(list(rows.values())).splitlines()[-1] == (
        "next turn at 256 (its first 192 tokens answered before): local 0.500s, kvcake "
        "0.200s, mooncake 0.500s; kvcake/local 0.42 (median of the pairs); tokens equal NO")


class _Recorded:
    """A stand-in for a vLLM process that writes down what is asked of it, and when; its
    TTFT is its connector's in ``TTFT``, its tokens ``[1]``."""

    log: list[str] = []

    def __init__(self, _python: Path, transfer: dict[str, Any] | None, *args: Any) -> None:
        self.name = transfer["name"] if transfer else "local"
        self.role = "reader" if f"start {self.name} reader" not in self.log else "writer"
        self.log.append(f"start {self.name} {self.role}")

    def ready(self) -> bool:
        return True

    def generate(self, prompt: list[int], max_tokens: int = 4) -> tuple[list[int], float]:
        self.log.append(f"{self.name} {self.role} {len(prompt)}")
        return [1], TTFT[self.name]

    def stop(self) -> str:
        self.log.append(f"stop {self.name} {self.role}")
        return ""


def test_readers_start_beside_their_writers_and_take_turns_once_every_writer_is_done(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting a vLLM process is most of the bench's time: each reader starts with its
    writer, but nothing is asked of a reader before every writer stopped and every cache
    settled; then the readers answer each prompt in turn, a different one first each time,
    so that hits of one prompt are seconds apart."""
    log: list[str] = []
    _Recorded.log = log
    monkeypatch.setattr(vllm_bench, "VllmInstance", _Recorded)
    names = ("kvcake", "mooncake", "example")
    paths = [vllm_bench.External(name, {"name": name}, settle=partial(log.append,
                                                                       f"settled {name}"))
             for name in names]
    prompts = {256: [[0] * 256, [1] * 256, [2] * 256]}
    turns = {256: [[3] * 256, [4] * 256, [5] * 256]}
    timings: Timings = {}
    plain = _Recorded(Path(sys.executable), None)
    vllm_bench._external(Path(sys.executable), prompts, turns, timings, paths,
                         plain)  # type: ignore[arg-type]
    assert [line for line in log if line.startswith("start")] == ["start local reader"] + [
        f"start {name} {role}" for name in names for role in ("reader", "writer")]
    done = max(log.index(f"settled {name}") for name in names)
    assert min(log.index(f"settled {name}") for name in names) > max(
        log.index(f"stop {name} writer") for name in names)
    asked = [i for i, line in enumerate(log) if " reader " in line]
    assert asked and min(asked) > done
    asks = [line.split()[0] for line in log if line.endswith("reader 256")]
    # three generates a reader and prompt (hit, its tokens, again), two for local's hit
    assert asks[:11] == ["local"] * 2 + [name for name in names for _ in range(3)]
    assert asks[:33:11] == ["local", "kvcake", "mooncake"]  # who goes first rotates
    # then the next turns, two generates each (TTFT, its tokens), first turns by writers
    assert asks[33:41] == ["local"] * 2 + [name for name in names for _ in range(2)]
    assert asks[33::8] == ["local", "kvcake", "mooncake"]
    assert log.count("kvcake writer 192") == 3 and "kvcake reader 192" not in log
    assert len(timings[("local", 256)]) == 3 and ("local again", 256) not in timings
    for name in ("local", *names):
        assert len(timings[(f"{name} next", 256)]) == 3
    for name in names:
        assert len(timings[(name, 256)]) == len(timings[(f"{name} again", 256)]) == 3
        assert f"stop {name} reader" in log
    rows = {row["connector"]: row for row in vllm_bench._rows(prompts, {
        **timings, ("cold", 256): [(2.0, [1])] * 3})}
    assert "vs_kvcake" not in rows["kvcake"] and rows["example"]["vs_kvcake"] == 2.0
    assert table(list(rows.values())).splitlines()[-2] == (
        "each hit over kvcake's hit of the same prompt, the readers taking turns (median of "
        "the pairs): mooncake 1.25 at 256, example 2.00 at 256")


def test_each_path_keeps_its_own_settings_while_all_of_them_are_open(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The readers of every path live at once: the drop-in's settings file must still name
    kvcake's master once the real Mooncake's is written."""
    masters = iter(["127.0.0.1:1", "127.0.0.1:2"])

    @contextmanager
    def store(_blocks: int) -> Iterator[tuple[str, Any]]:
        yield next(masters), lambda: None

    @contextmanager
    def real(*_args: Any) -> Iterator[RealMooncake]:
        yield RealMooncake(("ip", "netns", "exec", "x"), "198.18.0.1", "198.18.0.1:50051",
                           lambda: None)

    monkeypatch.setattr(vllm_bench, "_kvcake_store", store)
    monkeypatch.setattr(vllm_bench, "real_mooncake_store", real)
    monkeypatch.setattr(vllm_bench, "missing_real_mooncake", lambda _python: None)
    with ExitStack() as stack:
        paths = vllm_bench._paths(stack, Path(sys.executable), {256: [[0] * 256]})
        assert [path.name for path in paths] == ["kvcake", "mooncake", "mooncake-real",
                                                 "example"]
        settings = {path.name: json.loads(Path(path.env["MOONCAKE_CONFIG_PATH"]).read_text())
                    for path in paths if path.env}
        assert settings["mooncake"]["master_server_address"] == "127.0.0.1:2"
        assert settings["mooncake-real"]["master_server_address"] == "198.18.0.1:50051"
        assert paths[0].transfer["kv_connector_extra_config"]["master"] == "127.0.0.1:1"
        assert Path(paths[-1].transfer["kv_connector_extra_config"]["shared_storage_path"]
                    ).is_dir()


def test_a_reader_that_does_not_start_is_named_and_every_process_is_stopped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class _Failing(_Recorded):
        def ready(self) -> bool:
            return not (self.name == "mooncake" and self.role == "reader")

    log: list[str] = []
    _Recorded.log = log
    monkeypatch.setattr(vllm_bench, "VllmInstance", _Failing)
    paths = [vllm_bench.External(name, {"name": name}) for name in ("kvcake", "mooncake")]
    plain = _Failing(Path(sys.executable), None)
    with pytest.raises(KvcakeError, match=r"vLLM \(mooncake reader\) did not start"):
        vllm_bench._external(Path(sys.executable), {256: [[0] * 256]}, {256: [[1] * 256]},
                             {}, paths, plain)  # type: ignore[arg-type]
    assert {"stop kvcake reader", "stop mooncake reader", "stop kvcake writer",
            "stop mooncake writer"} <= set(log)
    assert not [line for line in log if line.endswith("reader 256")]  # nobody was timed
