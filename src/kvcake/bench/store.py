"""``kvcake bench store``: the KV store against Redis and the real Mooncake store, one run.

Each system gets a master (or Redis server) and a storage node in their own processes, and a
client process (``store_driver``) that makes the same Mooncake-API calls on every system:

    path  servers (master + node)            client
    shm   namespace a, 198.18.0.1            namespace a (kvcake: same-host shared memory)
    tcp   namespace a, 198.18.0.1            namespace b, 198.18.0.2 (another "host")

Mooncake binds every address, so it runs only inside a namespace; with the namespaces made
(for the tcp path or for Mooncake), every system's shm path runs inside ``a``, servers and
client together, so all of them go through the same network stack (this host's loopback
measured about 10 % slower per small call while namespaces with a veth pair existed). A
run of the shm path alone, without Mooncake, makes no namespaces and uses this host's
127.0.0.1. The shm path also has a single-thread memcpy reference for
``get_into`` / ``batch_get_into``. Batch 1 rows use the single-key calls (``put``, ``get``,
``put_from``, ``get_into``), larger batches the ``batch_*`` calls. ``ops_per_s`` counts
objects (keys, for the existence checks); the ratio columns (``vs_redis``, ``vs_mooncake``,
``vs_memcpy``) divide kvcake's by the other system's on the same path, op, size and batch.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcake.bench.baselines import memcpy_step
from kvcake.bench.measure import human_size, print_rows, throughput
from kvcake.bench.store_baselines import check_available, mooncake_master_binary
from kvcake.bench.store_driver import EXIST_KEYS, Case, Plan
from kvcake.common.config import KiB, MiB
from kvcake.common.errors import InvalidParamsError, KvcakeError
from kvcake.ops import NetnsPair, ServerProcess, Side, check_netns_support, etcd_command
from kvcake.ops.etcd import READY as ETCD_READY

PATHS = ("shm", "tcp")
BASELINES = ("redis", "mooncake", "kvcake-ha")  # kvcake-ha: kvcake's master on etcd
BATCHES = {64 * KiB: 32, 1 * MiB: 8, 16 * MiB: 2}  # object size -> objects per batch call
QUICK = Plan(reps=3, min_seconds=0.04, budget_bytes=128 * MiB)
FULL = Plan(reps=5, min_seconds=0.25, budget_bytes=256 * MiB)
_PORTS = {"kvcake": 50100, "kvcake-ha": 50100, "redis": 6379, "mooncake": 50051,
          "etcd": 2379, "etcd-peer": 2380}  # inside fresh namespaces


@dataclass(frozen=True)
class Placement:
    """Where one system's servers and its client run on one path."""

    path: str
    server_prefix: tuple[str, ...]
    server_host: str
    client_prefix: tuple[str, ...]
    client_host: str


def store_cases() -> list[Case]:
    cases = []
    for size, batch in BATCHES.items():
        cases += [Case(op, size, 1) for op in ("put", "get", "put_from", "get_into")]
        cases += [Case("batch_put_from", size, batch), Case("batch_get_into", size, batch)]
    return [*cases, Case("is_exist", 0, 1), Case("batch_is_exist", 0, EXIST_KEYS)]


def _placement(path: str, system: str, pair: NetnsPair | None) -> Placement:
    if path == "shm" and pair is None:
        return Placement(path, (), "127.0.0.1", (), "127.0.0.1")
    assert pair is not None, "namespaces are made whenever a placement needs them"
    client_side: Side = "a" if path == "shm" else "b"
    return Placement(path, tuple(pair.prefix("a")), pair.address("a"),
                     tuple(pair.prefix(client_side)), pair.address(client_side))


def _port(place: Placement, system: str) -> int:
    if place.server_prefix:
        return _PORTS[system]
    with socket.socket() as probe:  # a free port on this host's loopback
        probe.bind((place.server_host, 0))
        port: int = probe.getsockname()[1]
        return port


def _python(place: Placement, *args: str) -> list[str]:
    return [*place.server_prefix, sys.executable, "-m", *args]


ServerSpec = tuple[str, list[str], str]  # name, command, what its output says once ready


def _server_specs(system: str, place: Placement, port: int, segment: int,
                  scratch: str) -> list[ServerSpec]:
    """The processes ``system`` needs on ``place``, in start order."""
    host, address = place.server_host, f"{place.server_host}:{port}"
    if system == "redis":
        return [("redis-server", [*place.server_prefix, "redis-server", "--bind", host,
                                  "--port", str(port), "--save", "", "--appendonly", "no",
                                  "--protected-mode", "no", "--dir", scratch],
                 "Ready to accept connections")]
    if system == "mooncake":
        master = [*place.server_prefix, mooncake_master_binary(), f"--rpc_port={port}",
                  "--metrics_port=9003", "--default_kv_lease_ttl=2000"]
        node = _python(place, "kvcake.bench.store_driver", "mooncake-node", "--master",
                       address, "--host", host, "--segment-size", str(segment))
        return [("mooncake master", master, "Master service started"),
                ("mooncake node", node, "mounted")]
    etcd: list[ServerSpec] = []
    master_flags: list[str] = []
    if system == "kvcake-ha":
        etcd_port, peer_port = _port(place, "etcd"), _port(place, "etcd-peer")
        address = f"etcd://{host}:{etcd_port}"
        etcd = [("etcd", [*place.server_prefix, *etcd_command(
            Path(scratch) / "etcd", host, etcd_port, peer_port)], ETCD_READY)]
        master_flags = ["--etcd", address]
    master = _python(place, "kvcake.cli", "master", "--host", host, "--port", str(port),
                     "--metrics-port", "0", *master_flags)
    node = _python(place, "kvcake.cli", "node", "--master", address, "--host", host,
                   "--segment-size", f"{segment // MiB}MiB", "--name", "bench-node")
    return [*etcd, ("kvcake master", master, "listening on"), ("kvcake node", node, "mounted")]


def _client_server(system: str, specs: Sequence[ServerSpec], place: Placement,
                   port: int) -> str:
    """The address a client of ``system`` is given: the master's, or etcd's for HA."""
    if system == "kvcake-ha":
        node_command = specs[-1][1]
        return node_command[node_command.index("--master") + 1]
    return f"{place.server_host}:{port}"


def _run_driver(system: str, place: Placement, server: str, plan: Plan,
                cases: Sequence[Case]) -> list[dict[str, Any]]:
    command = [*place.client_prefix, sys.executable, "-m", "kvcake.bench.store_driver",
               "client", "--system", system, "--server", server, "--host", place.client_host,
               "--plan", json.dumps([plan.reps, plan.min_seconds, plan.budget_bytes]),
               "--cases", json.dumps([[c.op, c.size, c.batch] for c in cases])]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                                check=False)
    except subprocess.TimeoutExpired as exc:
        raise KvcakeError(f"{system} client on the {place.path} path hung") from exc
    if result.returncode != 0:
        raise KvcakeError(f"{system} client on the {place.path} path failed: "
                          f"{result.stderr.strip()[-1200:]}")
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return [{"system": system, "path": place.path, **row} for row in rows]


def _bench_system(system: str, place: Placement, plan: Plan,
                  cases: Sequence[Case]) -> list[dict[str, Any]]:
    # The node holds a put repetition's budget, the read working sets and the verified
    # objects with room to spare, so no system has to evict during a case.
    segment, port = 4 * plan.budget_bytes, _port(place, system)
    with ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory())
        specs = _server_specs(system, place, port, segment, scratch)
        servers = [stack.enter_context(ServerProcess(command, ready, name=name))
                   for name, command, ready in specs]
        try:
            return _run_driver(system, place, _client_server(system, specs, place, port),
                               plan, cases)
        except KvcakeError as exc:
            logs = " ".join(s.tail() for s in servers)
            raise KvcakeError(f"{exc.args[0]} {logs}") from exc


def _memcpy_rows(plan: Plan, cases: Sequence[Case]) -> list[dict[str, Any]]:
    """The same-host reference: a single-thread copy of the bytes a get_into delivers."""
    wanted = [c for c in cases if c.op in ("get_into", "batch_get_into")]
    nbytes = max((c.size * c.batch for c in wanted), default=0)
    src, dst = memoryview(bytearray(b"\x01" * nbytes)), memoryview(bytearray(b"\x02" * nbytes))
    rows = []
    for case in wanted:
        def step(size: int = case.size, batch: int = case.batch) -> int:
            return memcpy_step(dst, src, size, batch)

        rate = throughput(step, plan.reps, plan.min_seconds) / case.size
        rows.append({"system": "memcpy", "path": "shm", "op": case.op, "size": case.size,
                     "batch": case.batch, "ops_per_s": rate, "gbps": rate * case.size / 1e9})
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Put ``vs_<system>`` (objects/s ratio, same path/op/size/batch) on the kvcake rows."""
    def case(row: dict[str, Any]) -> tuple[Any, ...]:
        return row["path"], row["op"], row["size"], row["batch"]

    index = {(row["system"], *case(row)): row for row in rows}
    for row in rows:
        lone = index.get(("kvcake", *case(row)))
        if row["system"] == "kvcake-ha" and lone and lone["ops_per_s"]:
            row["vs_kvcake"] = row["ops_per_s"] / lone["ops_per_s"]
        if row["system"] != "kvcake":
            continue
        for other in ("redis", "mooncake", "memcpy"):
            base = index.get((other, *case(row)))
            if base and base["ops_per_s"]:
                row[f"vs_{other}"] = row["ops_per_s"] / base["ops_per_s"]


def _table(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """One line per (path, op, size, batch), each system's GB/s and op/s side by side."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        size = row["size"]
        line = merged.setdefault((row["path"], row["op"], size, row["batch"]), {
            "path": row["path"], "op": row["op"], "batch": row["batch"],
            "size_h": human_size(size) if size else "-"})
        line[f"{row['system']}_gbps"] = row["gbps"]
        line[f"{row['system']}_ops"] = row["ops_per_s"]
        line.update({k: v for k, v in row.items() if k.startswith("vs_")})
    present = {row["system"] for row in rows}
    columns = [("path", "path"), ("op", "op"), ("size_h", "size"), ("batch", "batch")]
    for system in ("kvcake", "kvcake-ha", "redis", "mooncake"):
        if system in present:
            columns += [(f"{system}_gbps", f"{system} GB/s"), (f"{system}_ops", f"{system} op/s")]
    if "memcpy" in present:
        columns.append(("memcpy_gbps", "memcpy GB/s"))
    for other in ("redis", "mooncake", "memcpy"):
        if any(f"vs_{other}" in row for row in rows):
            columns.append((f"vs_{other}", f"vs {other}"))
    if any("vs_kvcake" in row for row in rows):
        columns.append(("vs_kvcake", "ha / lone"))
    return list(merged.values()), columns


def _verdict(text: str, met: bool) -> str:
    return f"{text}  [{'ok' if met else 'MISSED'}]"


def _big_tcp_lines(big_tcp: list[dict[str, Any]]) -> list[str]:
    """1-16 MiB over tcp: against each baseline, and the median of each row's smaller
    ratio (the target: at least 1.5x both)."""
    lines = []
    for other in ("mooncake", "redis"):
        ratios = sorted(row[f"vs_{other}"] for row in big_tcp if f"vs_{other}" in row)
        if ratios:
            text = (f"tcp 1-16 MiB put/get vs {other}: min {ratios[0]:.2f}, "
                    f"median {ratios[len(ratios) // 2]:.2f} (target >= 1.5)")
            lines.append(_verdict(text, ratios[0] >= 1.5))
    both = sorted(min(row["vs_mooncake"], row["vs_redis"]) for row in big_tcp
                  if "vs_mooncake" in row and "vs_redis" in row)
    if both:
        median = both[len(both) // 2]
        lines.append(_verdict(f"tcp 1-16 MiB put/get, median of each row's smaller ratio "
                              f"(vs redis, vs mooncake): {median:.2f} (target >= 1.5)",
                              median >= 1.5))
    return lines


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """The targets, read off the kvcake rows of this run."""
    kvcake = [row for row in rows if row["system"] == "kvcake"]
    big_tcp = [row for row in kvcake if row["path"] == "tcp" and row["size"] >= MiB]
    lines = _ha_lines(rows) + _big_tcp_lines(big_tcp)
    memcpy = [row["vs_memcpy"] for row in kvcake if "vs_memcpy" in row and row["size"] >= MiB]
    if memcpy:
        text = (f"shm 1-16 MiB get_into/batch_get_into vs memcpy: min {min(memcpy):.2f} "
                "(target >= 0.5)")
        lines.append(_verdict(text, min(memcpy) >= 0.5))
    lines += _single_key_lines(rows)
    for row in kvcake:
        if row["op"] == "batch_get_into" and row["size"] == 64 * KiB and "vs_mooncake" in row:
            text = (f"{row['path']} 64 KiB batch_get_into: {row['ops_per_s']:,.0f} objects/s, "
                    f"{row['vs_mooncake']:.2f}x Mooncake (target >= 1.0)")
            lines.append(_verdict(text, row["vs_mooncake"] >= 1.0))
        if row["op"] == "batch_is_exist":
            text = (f"{row['path']} batch_is_exist ({row['batch']} keys): "
                    f"{row['ops_per_s']:,.0f} keys/s (target >= 100,000)")
            lines.append(_verdict(text, row["ops_per_s"] >= 100_000))
    return lines


def _single_key_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Single small operations: 64 KiB put/get against Redis, ``is_exist`` against Mooncake
    (each at least 1.0x), with each client's CPU time per operation."""
    index = {(r["system"], r["path"], r["op"], r["size"], r["batch"]): r for r in rows}
    lines = []
    for path in PATHS:
        for op, other in (("put", "redis"), ("get", "redis"), ("is_exist", "mooncake")):
            for size in (0, 64 * KiB):
                r, base = (index.get((system, path, op, size, 1))
                           for system in ("kvcake", other))
                if r is None or base is None or f"vs_{other}" not in r:
                    continue
                shown = f" {human_size(size)}" if size else ""
                text = (f"{path} {op}{shown} single: {r['ops_per_s']:,.0f}/s, "
                        f"{r[f'vs_{other}']:.2f}x {other.capitalize()} (target >= 1.0); "
                        f"client CPU {r['cpu_us']:.0f} us/op ({other} {base['cpu_us']:.0f})")
                lines.append(_verdict(text, r[f"vs_{other}"] >= 1.0))
    return lines


def _ha_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The cost of a master on etcd, per path: median ha/lone ratio of puts and of reads."""
    lines = []
    for path in PATHS:
        ha = [r for r in rows if r["system"] == "kvcake-ha" and r["path"] == path
              and "vs_kvcake" in r]
        for kind, ops in (("put", ("put", "put_from", "batch_put_from")),
                          ("get/exist", ("get", "get_into", "batch_get_into", "is_exist",
                                         "batch_is_exist"))):
            ratios = sorted(r["vs_kvcake"] for r in ha if r["op"] in ops)
            if ratios:
                lines.append(f"{path} {kind} on an HA master (etcd) vs a lone master: median "
                             f"{ratios[len(ratios) // 2]:.2f}x, min {ratios[0]:.2f}x "
                             f"({len(ratios)} cases)")
    return lines


@contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit for the body, so servers and namespaces are torn down."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _checked(names: Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise InvalidParamsError(f"{what}: {', '.join(unknown) or 'none'}; "
                                 f"choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def bench_systems(systems: Sequence[str], paths: Sequence[str], quick: bool,
                  as_json: bool) -> int:
    """Measure ``systems`` on ``paths`` and print rows (and, as text, the summary)."""
    paths = _checked(paths, PATHS, "unknown path")
    for system in _checked(systems, ("kvcake", *BASELINES), "unknown system"):
        if system != "kvcake":
            check_available(system)
    if "tcp" in paths:
        check_netns_support("the tcp path (servers on another host, in a namespace)")
    if "mooncake" in systems:
        check_netns_support("--against mooncake (it binds every address: namespace only)")
    needs_netns = "tcp" in paths or "mooncake" in systems
    plan, cases, rows = QUICK if quick else FULL, store_cases(), []
    with ExitStack() as stack:
        stack.enter_context(_exit_on_sigterm())
        pair = stack.enter_context(NetnsPair("kvcake-store")) if needs_netns else None
        for path in paths:
            for system in systems:
                rows += _bench_system(system, _placement(path, system, pair), plan, cases)
            if path == "shm":
                rows += _memcpy_rows(plan, cases)
    add_ratios(rows)
    if as_json:
        print_rows(rows, (), as_json=True)
        return 0
    lines, columns = _table(rows)
    print_rows(lines, columns, as_json=False)
    print()
    for line in summary(rows):
        print(line)
    sys.stdout.flush()
    return 0


def run_store_bench(quick: bool, as_json: bool, against: Sequence[str],
                    paths: Sequence[str]) -> int:
    """``kvcake bench store``: kvcake, plus each system in ``against`` (redis, mooncake),
    on each of ``paths`` (shm, tcp; tcp needs root for its network namespaces)."""
    against = _checked(against, BASELINES, "unknown --against system") if against else []
    return bench_systems(("kvcake", *against), paths, quick, as_json)
