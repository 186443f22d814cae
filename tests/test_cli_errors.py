"""Every ``kvcake`` command turns a bad value or a failed start into one line on stderr that
names what was wrong, and a non-zero exit (2 for usage and bad values), never a traceback.

Each case runs the real command in a child process. A port "in use" is held by a listening
socket of this test for the length of the case. ``CASES`` is the list walked (the report of
what is covered).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PORT = "{port}"  # replaced by the port a socket of this test holds


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    named: str  # what the one line must contain ({port} is the held port)
    exit_code: int
    env: dict[str, str] = field(default_factory=dict)


CASES = [
    # ports in use: a failed start, exit 1
    Case("master port in use", ("master", "--port", PORT, "--metrics-port", "-1"),
         "127.0.0.1:{port}: address already in use", 1),
    Case("master metrics port in use", ("master", "--port", "0", "--metrics-port", PORT),
         "127.0.0.1:{port}: address already in use", 1),
    Case("node port in use", ("node", "--master", "127.0.0.1:9", "--segment-size", "1MiB",
                              "--port", PORT), "127.0.0.1:{port}: address already in use", 1),
    Case("transfer serve port in use", ("transfer", "serve", "--port", PORT),
         "127.0.0.1:{port}: address already in use", 1),
    Case("conductor API port in use", ("conductor", "--port", PORT, "--rpc-port", "0"),
         "127.0.0.1:{port}: address already in use", 1),
    Case("conductor RPC port in use", ("conductor", "--port", "0", "--rpc-port", PORT),
         "127.0.0.1:{port}: address already in use", 1),
    Case("worker port in use", ("worker", "--port", PORT, "--conductor", "127.0.0.1:9",
                                "--no-profile"), "127.0.0.1:{port}: address already in use", 1),
    Case("up API port in use", ("up", "--port", PORT, "--no-store"),
         "127.0.0.1:{port}: address already in use", 2),
    # bad values: exit 2
    Case("--log-level bogus", ("--log-level", "bogus", "bench", "reuse"), "'bogus'", 2),
    Case("KVCAKE_LOG_LEVEL=bogus", ("bench", "reuse", "--lengths", "8"), "'BOGUS'", 2,
         {"KVCAKE_LOG_LEVEL": "bogus"}),
    Case("bench reuse --lengths 1k", ("bench", "reuse", "--lengths", "1k"), "'1k'", 2),
    Case("up --config with a string count", ("up", "--config", "{tmp}/bad.toml"),
         "[cluster] prefill must be a whole number, got 'two'", 2),
    Case("up --config with a number as text", ("up", "--config", "{tmp}/float.toml"),
         "[cluster] slo_ttft_s must be a number, got '3'", 2),
    Case("worker --cpus the machine lacks", ("worker", "--cpus", "4096", "--conductor",
                                             "127.0.0.1:9"), "CPU(s) [4096]", 2),
    Case("worker --cpus backwards", ("worker", "--cpus", "3-1"), "'3-1'", 2),
    Case("node --segment-size lots", ("node", "--segment-size", "lots"), "'lots'", 2),
    Case("transfer serve --size 12x", ("transfer", "serve", "--size", "12x"), "'12x'", 2),
    Case("up --prefill -1", ("up", "--prefill", "-1"), "prefill=-1", 2),
    Case("up --port text", ("up", "--port", "eighty"), "'eighty'", 2),
    Case("master --eviction nope", ("master", "--eviction", "nope"), "'nope'", 2),
    Case("bench serve --admission maybe", ("bench", "serve", "--admission", "maybe"),
         "'maybe'", 2),
    Case("bench store --paths nope", ("bench", "store", "--quick", "--paths", "nope"),
         "nope", 2),
    Case("bench transfer --transports nope", ("bench", "transfer", "--quick",
                                              "--transports", "nope"), "'nope'", 2),
    Case("sim --speed -1", ("sim", "--speed", "-1", "--limit", "3"), "-1", 2),
    Case("sim cache --trace missing", ("sim", "cache", "--trace", "{tmp}/none.jsonl"),
         "none.jsonl", 2),
    Case("node --disk-dir holding another program's *.kv", (
        "node", "--master", "127.0.0.1:9", "--segment-size", "1MiB", "--disk-dir",
        "{tmp}/disk", "--disk-capacity", "1MiB"), "did not write (model.kv)", 2),
    Case("chaos --scenarios nope", ("chaos", "--scenarios", "nope"), "'nope'", 2),
    Case("an unknown command", ("serve",), "'serve'", 2),
]


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another process (this test) is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_failure_is_one_line_naming_what_was_wrong(case: Case, held_port: int,
                                                     tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[cluster]\nprefill = "two"\n')
    (tmp_path / "float.toml").write_text('[cluster]\nslo_ttft_s = "3"\n')
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "model.kv").write_text("not the tier's")
    argv = [arg.format(port=held_port, tmp=tmp_path) for arg in case.argv]
    env = {**os.environ, "KVCAKE_LOG_LEVEL": "WARNING", **case.env}
    result = subprocess.run([sys.executable, "-m", "kvcake.cli", *argv], env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=100, check=False)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert result.returncode == case.exit_code, result.stderr
    assert "error:" in lines[0]
    assert case.named.format(port=held_port) in lines[0], lines[0]
