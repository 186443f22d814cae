import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvcake.cli import main
from kvcake.cli_flags import field_defaults, field_docs
from kvcake.cluster.up import ClusterSpec
from kvcake.conductor.config import ConductorServerConfig
from kvcake.engine.config import EngineConfig
from kvcake.store.master.config import MasterConfig


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


@pytest.mark.parametrize(("command", "config", "flag", "field"), [
    ("master", MasterConfig, "--high-watermark", "high_watermark"),
    ("master", MasterConfig, "--summary-interval", "summary_s"),
    ("worker", EngineConfig, "--kv-cache-size", "kv_cache_bytes"),
    ("conductor", ConductorServerConfig, "--keep-alive", "keep_alive_s"),
    ("up", ClusterSpec, "--max-num-batched-tokens", "max_num_batched_tokens"),
])
def test_a_flag_and_its_help_come_from_its_config_field(
        command: str, config: type, flag: str, field: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    options = " ".join(capsys.readouterr().out.split("options:")[1].split())
    entry = options[options.index(f"{flag} "):]
    assert entry.split(" --")[0].endswith(
        f"(default {field_defaults(config)[field]})"), entry[:200]
    assert field_docs(config)[field].split()[0] in entry.split(" --")[0]


def test_a_server_reads_its_config_file_and_flags_override_it(tmp_path: Path) -> None:
    config = tmp_path / "master.toml"
    config.write_text("[master]\nhigh_watermark = 3.0\n")
    result = kvcake("master", "--config", str(config))
    assert result.returncode == 2 and "high_watermark must be 0.1..1, got 3.0" in result.stderr
    result = kvcake("master", "--config", str(config), "--high-watermark", "5")
    assert "high_watermark must be 0.1..1, got 5.0" in result.stderr
    config.write_text("[master]\nhigh_water = 0.5\n")
    result = kvcake("master", "--config", str(config))
    assert result.returncode == 2 and "unknown [master] keys ['high_water']" in result.stderr
