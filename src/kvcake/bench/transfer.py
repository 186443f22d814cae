"""``kvcake bench transfer``: the transfer engine against memcpy, a plain socket and Mooncake.

The peer that owns the segment is a separate process (``kvcake transfer serve``); this
process is the initiator. ``shm`` is compared with a single-thread memcpy, ``tcp`` with a
plain Python ``sendall``/``recv_into`` stream to another process, same sizes, same run.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kvcake.bench.baselines import SocketBaseline, memcpy_step
from kvcake.bench.measure import human_size, print_rows, throughput
from kvcake.common.config import KiB, MiB
from kvcake.transfer.batch import RemoteSegment, TransferOp, TransferRequest
from kvcake.transfer.config import TransferConfig
from kvcake.transfer.engine import TransferEngine
from kvcake.transfer.peer import PeerProcess
from kvcake.transfer.segment import private_buffer

CASES = ((64 * KiB, (1, 64)), (1 * MiB, (1, 32)), (16 * MiB, (1, 16)))
BUFFER_BYTES = 256 * MiB
COLUMNS = (
    ("transport", "transport"), ("op", "op"), ("size_h", "size"), ("batch", "batch"),
    ("gbps", "GB/s"), ("objects_per_s", "obj/s"), ("baseline", "baseline"),
    ("baseline_gbps", "base GB/s"), ("ratio", "ratio"), ("mooncake_gbps", "mooncake GB/s"),
    ("vs_mooncake", "vs mooncake"),
)


@dataclass(frozen=True)
class Plan:
    reps: int
    min_seconds: float


def _cases() -> Iterator[tuple[int, int]]:
    for size, batches in CASES:
        for batch in batches:
            yield size, batch


def _engine_step(
    engine: TransferEngine, remote: RemoteSegment, local: memoryview, op: TransferOp,
    size: int, batch: int,
) -> Callable[[], int]:
    requests = [
        TransferRequest(op, remote, i * size, local[i * size : (i + 1) * size])
        for i in range(batch)
    ]

    def step() -> int:
        engine.transfer(requests)
        return size * batch

    return step


def _row(transport: str, op: TransferOp, size: int, batch: int, rate: float, baseline: str,
         base_rate: float) -> dict[str, Any]:
    return {
        "transport": transport, "op": op.name.lower(), "size": size, "size_h": human_size(size),
        "batch": batch, "gbps": rate / 1e9, "objects_per_s": rate / size,
        "baseline": baseline, "baseline_gbps": base_rate / 1e9, "ratio": rate / base_rate,
    }


def _bench_transport(transport: str, peer: PeerProcess, plan: Plan,
                     emit: Callable[[dict[str, Any]], None]) -> None:
    with TransferEngine(TransferConfig(transport=transport)) as engine:
        remote = engine.open_segment(peer.segment)
        local = engine.allocate_buffer(BUFFER_BYTES).view
        baseline = _Baseline(transport, local)
        try:
            for size, batch in _cases():
                for op in (TransferOp.READ, TransferOp.WRITE):
                    step = _engine_step(engine, remote, local, op, size, batch)
                    rate = throughput(step, plan.reps, plan.min_seconds)
                    base = throughput(baseline.step(op, size, batch), plan.reps, plan.min_seconds)
                    emit(_row(transport, op, size, batch, rate, baseline.name, base))
        finally:
            baseline.close()


class _Baseline:
    def __init__(self, transport: str, local: memoryview) -> None:
        self.name = "memcpy" if transport == "shm" else "socket"
        self._local = local
        # page-aligned like the engine's segments (see private_buffer)
        self._other = memoryview(private_buffer(BUFFER_BYTES)) if transport == "shm" else None
        self._socket = SocketBaseline(BUFFER_BYTES) if transport != "shm" else None

    def step(self, op: TransferOp, size: int, batch: int) -> Callable[[], int]:
        if self._other is not None:
            other, local = self._other, self._local
            src, dst = (other, local) if op is TransferOp.READ else (local, other)
            return lambda: memcpy_step(dst, src, size, batch)
        sock = self._socket
        assert sock is not None
        move = sock.read if op is TransferOp.READ else sock.write
        return lambda: move(self._local, size, batch)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    big = [r for r in rows if r["size"] >= MiB]
    shm = median([r["ratio"] for r in big if r["transport"] == "shm"])
    tcp = median([r["ratio"] for r in big if r["transport"] == "tcp"])
    small = median([r["objects_per_s"] for r in rows
                    if r["transport"] == "tcp" and r["size"] == 64 * KiB and r["batch"] > 1])
    lines = []
    if not math.isnan(shm):  # shm was measured
        lines.append(f"shm 1-16 MiB vs memcpy: median ratio {shm:.2f} (target >= 0.6)")
    if not math.isnan(tcp):
        lines.append(f"tcp 1-16 MiB vs plain socket: median ratio {tcp:.2f} (target >= 0.7)")
        lines.append(f"tcp 64 KiB batched: median {small:,.0f} objects/s (target >= 15,000)")
    moon = [r["vs_mooncake"] for r in big if r.get("vs_mooncake")]
    if moon:
        lines.append(f"tcp 1-16 MiB vs Mooncake TCP: median ratio {median(moon):.2f} "
                     "(target >= 1.5)")
    return lines


def run_transfer_bench(quick: bool, as_json: bool, transports: list[str],
                       against: str | None) -> int:
    plan = Plan(reps=3, min_seconds=0.08) if quick else Plan(reps=7, min_seconds=0.3)
    rows: list[dict[str, Any]] = []
    with PeerProcess("bench", BUFFER_BYTES, fill=1) as peer:
        for transport in transports:
            _bench_transport(transport, peer, plan, rows.append)
    if against == "mooncake":
        from kvcake.bench.mooncake import add_mooncake_columns

        add_mooncake_columns(rows, plan.reps, plan.min_seconds)
    print_rows(rows, COLUMNS, as_json)
    if not as_json:
        print()
        for line in _summary(rows):
            print(line)
    sys.stdout.flush()
    return 0
