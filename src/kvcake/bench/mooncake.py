"""Mooncake's own transfer engine (TCP) on the same sizes, for ``--against mooncake``.

Needs ``pip install mooncake-transfer-engine-non-cuda`` and ``apt-get install libibverbs1
librdmacm1``. Mooncake's processes bind every address, so both of them run inside a private
network namespace (``unshare -n``, loopback only) with its P2P handshake; kvcake's numbers
are loopback too, so both use the same path. Run as ``python -m kvcake.bench.mooncake`` it
is the in-namespace side and prints one JSON line per case.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import subprocess
import sys
import time
from multiprocessing.queues import Queue
from typing import Any

from kvcake.bench.measure import throughput
from kvcake.common.errors import KvcakeError

_BUFFER_BYTES = 256 << 20
_INSTALL_HINT = (
    "--against mooncake needs Mooncake's wheel: pip install mooncake-transfer-engine-non-cuda "
    "(and apt-get install libibverbs1 librdmacm1)"
)


def add_mooncake_columns(rows: list[dict[str, Any]], reps: int, min_seconds: float) -> None:
    """Measure Mooncake on every tcp row's case and add ``mooncake_gbps`` / ``vs_mooncake``."""
    if importlib.util.find_spec("mooncake") is None:
        raise KvcakeError(_INSTALL_HINT)
    cases = sorted({(r["op"], r["size"], r["batch"]) for r in rows if r["transport"] == "tcp"})
    script = (f"ip link set lo up && exec {sys.executable} -m kvcake.bench.mooncake "
              f"{reps} {min_seconds} '{json.dumps(cases)}'")
    result = subprocess.run(["unshare", "-n", "sh", "-c", script], check=False,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise KvcakeError(f"Mooncake run failed: {result.stderr.strip()[-800:]}")
    measured = {(m["op"], m["size"], m["batch"]): m["gbps"]
                for m in map(json.loads, result.stdout.splitlines())}
    for row in rows:
        gbps = measured.get((row["op"], row["size"], row["batch"]))
        if row["transport"] == "tcp" and gbps:
            row["mooncake_gbps"] = gbps
            row["vs_mooncake"] = row["gbps"] / gbps


def _engine() -> Any:
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        raise KvcakeError("Mooncake TransferEngine.initialize failed")
    return engine


def _target(queue: Queue[tuple[int, int]]) -> None:
    engine = _engine()
    address = engine.allocate_managed_buffer(_BUFFER_BYTES)
    queue.put((engine.get_rpc_port(), address))
    time.sleep(3600)  # killed by the parent


def _measure(reps: int, min_seconds: float, cases: list[tuple[str, int, int]]) -> None:
    context = multiprocessing.get_context("spawn")
    queue: Queue[tuple[int, int]] = context.Queue()
    target = context.Process(target=_target, args=(queue,), daemon=True)
    target.start()
    try:
        port, remote = queue.get(timeout=120)
        engine = _engine()
        local = engine.allocate_managed_buffer(_BUFFER_BYTES)
        peer = f"127.0.0.1:{port}"
        for op, size, batch in cases:
            move = engine.batch_transfer_sync_read if op == "read" else (
                engine.batch_transfer_sync_write)
            mine = [local + i * size for i in range(batch)]
            theirs = [remote + i * size for i in range(batch)]

            def step(move: Any = move, mine: list[int] = mine, theirs: list[int] = theirs,
                     size: int = size, batch: int = batch) -> int:
                if move(peer, mine, theirs, [size] * batch) != 0:
                    raise KvcakeError("Mooncake transfer failed")
                return size * batch

            rate = throughput(step, reps, min_seconds)
            print(json.dumps({"op": op, "size": size, "batch": batch, "gbps": rate / 1e9}),
                  flush=True)
    finally:
        target.kill()
        target.join()


if __name__ == "__main__":
    _measure(int(sys.argv[1]), float(sys.argv[2]), [tuple(c) for c in json.loads(sys.argv[3])])
