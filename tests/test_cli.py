import json
import subprocess
import sys

import pytest

from kvcake.cli import main


def kvcake(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvcake.cli", *args],
                          check=False, capture_output=True, text=True, timeout=120)


def test_bench_transfer_quick_json_reports_ratios() -> None:
    result = kvcake("bench", "transfer", "--quick", "--json", "--transports", "shm")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {(r["op"], r["size"], r["batch"]) for r in rows} == {
        (op, size, batch) for op in ("read", "write")
        for size, batches in ((65536, (1, 64)), (1 << 20, (1, 32)), (16 << 20, (1, 16)))
        for batch in batches
    }
    for row in rows:
        assert {"transport", "op", "size", "batch", "gbps", "baseline_gbps", "ratio"} <= row.keys()
        assert row["transport"] == "shm" and row["baseline"] == "memcpy"
        assert row["gbps"] > 0
        assert row["ratio"] == pytest.approx(row["gbps"] / row["baseline_gbps"])


def test_bad_input_is_named_and_exits_2(capsys: object) -> None:
    assert main(["transfer", "serve", "--size", "huge"]) == 2
    result = kvcake("transfer", "serve", "--size", "huge")
    assert result.returncode == 2
    assert "not a size: 'huge'" in result.stderr


@pytest.mark.parametrize(("args", "named"), [
    (("master", "--eviction", "bogus"), "unknown eviction policy 'bogus'"),
    (("master", "--placement", "nearest"), "unknown placement policy 'nearest'"),
    (("master", "--high-watermark", "3"), "high_watermark must be 0.1..1"),
    (("master", "--port", "70000"), "port must be 0..65535"),
    (("node", "--segment-size", "12XB"), "not a size: '12XB'"),
    (("node", "--segment-size", "0"), "needs --segment-size > 0"),
    (("node", "--segment-size", "1MiB", "--master", "nohost"), "master must be HOST:PORT"),
    (("node", "--segment-size", "1MiB", "--disk-dir", "/tmp/x"), "disk_dir and disk_capacity"),
])
def test_store_commands_name_bad_input(args: tuple[str, ...], named: str) -> None:
    result = kvcake(*args)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr


def test_node_without_a_master_fails_clearly() -> None:
    result = kvcake("node", "--segment-size", "1MiB", "--master", "127.0.0.1:1")
    assert result.returncode == 2
    assert "RPC_FAIL" in result.stderr and "127.0.0.1:1" in result.stderr
