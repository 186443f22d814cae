"""The store benchmark's bookkeeping: ratios between systems, the HA line, server commands,
where each system runs."""

from __future__ import annotations

import shutil
from typing import Any

import pytest

from kvcake.bench.store import (
    Placement,
    _client_server,
    _placement,
    _server_specs,
    add_ratios,
    summary,
)
from kvcake.common.config import KiB, MiB
from kvcake.ops import NetnsPair


def row(system: str, op: str, ops_per_s: float, path: str = "shm", size: int = 64 * KiB,
        batch: int = 1, cpu_us: float = 50.0) -> dict[str, Any]:
    return {"system": system, "path": path, "op": op, "size": size, "batch": batch,
            "ops_per_s": ops_per_s, "gbps": ops_per_s * size / 1e9, "cpu_us": cpu_us}


def test_ha_rows_get_their_ratio_to_the_lone_master_and_a_median_line() -> None:
    rows = [row("kvcake", "put", 1000), row("kvcake-ha", "put", 400),
            row("kvcake", "batch_put_from", 900, batch=32),
            row("kvcake-ha", "batch_put_from", 810, batch=32),
            row("kvcake", "put_from", 1000), row("kvcake-ha", "put_from", 500),
            row("kvcake", "get", 2000), row("kvcake-ha", "get", 2000),
            row("redis", "get", 1000)]
    add_ratios(rows)
    ha = {r["op"]: r["vs_kvcake"] for r in rows if r["system"] == "kvcake-ha"}
    assert ha == {"put": 0.4, "batch_put_from": 0.9, "put_from": 0.5, "get": 1.0}
    assert rows[6]["vs_redis"] == 2.0
    assert "vs_kvcake" not in rows[6]
    lines = summary(rows)
    assert "shm put on an HA master (etcd) vs a lone master: median 0.50x, min 0.40x " \
           "(3 cases)" in lines
    assert "shm get/exist on an HA master (etcd) vs a lone master: median 1.00x, min 1.00x " \
           "(1 cases)" in lines


@pytest.mark.skipif(shutil.which("etcd") is None, reason="needs the etcd server binary")
def test_the_ha_system_starts_etcd_then_a_master_and_node_given_etcd() -> None:
    place = Placement("shm", (), "127.0.0.1", (), "127.0.0.1")
    specs = _server_specs("kvcake-ha", place, 5000, 64 * MiB, "/tmp/scratch")
    assert [name for name, _, _ in specs] == ["etcd", "kvcake master", "kvcake node"]
    server = _client_server("kvcake-ha", specs, place, 5000)
    assert server.startswith("etcd://127.0.0.1:")
    assert specs[1][1][-2:] == ["--etcd", server]
    assert _client_server("kvcake", _server_specs("kvcake", place, 5000, 64 * MiB, "/s"),
                          place, 5000) == "127.0.0.1:5000"


def test_single_key_rows_are_held_to_redis_and_mooncake() -> None:
    rows = [row("kvcake", "put", 3000, cpu_us=180), row("redis", "put", 6000, cpu_us=90),
            row("kvcake", "get", 8000, path="tcp"), row("redis", "get", 7000, path="tcp"),
            row("kvcake", "is_exist", 12000, size=0), row("mooncake", "is_exist", 24000, size=0),
            row("kvcake", "put", 900, size=MiB), row("redis", "put", 100, size=MiB)]
    add_ratios(rows)
    lines = summary(rows)
    assert "shm put 64 KiB single: 3,000/s, 0.50x Redis (target >= 1.0); client CPU 180 " \
           "us/op (redis 90)  [MISSED]" in lines
    assert "tcp get 64 KiB single: 8,000/s, 1.14x Redis (target >= 1.0); client CPU 50 " \
           "us/op (redis 50)  [ok]" in lines
    assert "shm is_exist single: 12,000/s, 0.50x Mooncake (target >= 1.0); client CPU 50 " \
           "us/op (mooncake 50)  [MISSED]" in lines
    assert not any("1 MiB single" in line for line in lines)


def test_large_tcp_rows_are_held_to_the_smaller_of_their_two_ratios() -> None:
    rows = []
    for op, ours, redis, mooncake in (("put", 300, 100, 250), ("get", 400, 100, 100),
                                      ("put_from", 90, 100, 30)):
        rows += [row("kvcake", op, ours, path="tcp", size=MiB),
                 row("redis", op, redis, path="tcp", size=MiB),
                 row("mooncake", op, mooncake, path="tcp", size=MiB)]
    add_ratios(rows)
    lines = summary(rows)  # smaller ratios per row: 1.2, 4.0, 0.9
    assert "tcp 1-16 MiB put/get, median of each row's smaller ratio (vs redis, vs " \
           "mooncake): 1.20 (target >= 1.5)  [MISSED]" in lines
    assert "tcp 1-16 MiB put/get vs redis: min 0.90, median 3.00 (target >= 1.5)  [MISSED]" \
        in lines


def test_with_namespaces_every_systems_shm_path_runs_in_the_same_one() -> None:
    """Mooncake must run in a namespace; the others then share its network stack on the shm
    path (this host's loopback slows down while namespaces exist), and only a run without
    namespaces uses the host's own."""
    pair = NetnsPair("kvcake-test")  # names and addresses only: nothing is made
    places = {system: _placement("shm", system, pair) for system in ("kvcake", "redis",
                                                                      "mooncake")}
    assert len(set(places.values())) == 1
    place = places["kvcake"]
    assert place.server_prefix == place.client_prefix == tuple(pair.prefix("a"))
    assert place.server_host == place.client_host == pair.address("a")
    alone = _placement("shm", "kvcake", None)
    assert (alone.server_prefix, alone.server_host, alone.client_host) == ((), "127.0.0.1",
                                                                           "127.0.0.1")
    tcp = _placement("tcp", "kvcake", pair)
    assert tcp.client_prefix == tuple(pair.prefix("b")) != tcp.server_prefix
