"""The client side of ``kvcake bench store``: one process that drives a store and prints one
JSON line per case. The same calls drive kvcake, Mooncake and Redis: all three speak
Mooncake's ``MooncakeDistributedStore`` method names; only construction differs.

Run as ``python -m kvcake.bench.store_driver client ...`` (inside the client's namespace) or
``... mooncake-node ...`` (a Mooncake storage node, inside the servers' namespace).

Keys are fresh for every put (a put of an existing key succeeds without writing, so reusing
keys would time nothing); each put repetition writes at most ``budget_bytes`` and then removes
its keys, untimed. Every case is checked once: the bytes read back equal the bytes written.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import mmap
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvcake.common.errors import KvcakeError

PUT_OPS = ("put", "put_from", "batch_put_from")
GET_OPS = ("get", "get_into", "batch_get_into")
EXIST_OPS = ("is_exist", "batch_is_exist")
EXIST_KEYS = 64
LOCAL_BUFFER_BYTES = 64 << 20

Step = Callable[[], int]  # one call; returns how many objects (or keys) it handled


class StoreLike(Protocol):
    """The part of Mooncake's store API the benchmark calls."""

    def register_buffer(self, buffer_ptr: int, size: int) -> int: ...
    def put(self, key: str, value: bytes) -> int: ...
    def get(self, key: str) -> bytes: ...
    def put_from(self, key: str, buffer_ptr: int, size: int) -> int: ...
    def get_into(self, key: str, buffer_ptr: int, size: int) -> int: ...
    def batch_put_from(self, keys: list[str], buffer_ptrs: list[int],
                       sizes: list[int]) -> list[int]: ...
    def batch_get_into(self, keys: list[str], buffer_ptrs: list[int],
                       sizes: list[int]) -> list[int]: ...
    def is_exist(self, key: str) -> int: ...
    def batch_is_exist(self, keys: list[str]) -> list[int]: ...
    def remove(self, key: str) -> int: ...
    def remove_all(self) -> int: ...
    def close(self) -> int: ...


@dataclass(frozen=True)
class Case:
    op: str
    size: int  # object bytes (0 for the existence checks)
    batch: int  # objects (or keys) per call


@dataclass(frozen=True)
class Plan:
    reps: int  # timed repetitions; the median is reported
    min_seconds: float  # each repetition runs at least this long ...
    budget_bytes: int  # ... unless a put repetition has written this much


def open_store(system: str, server: str, host: str) -> StoreLike:
    """A connected client of ``system`` whose master (or Redis server) is ``server``."""
    if system == "redis":
        from kvcake.bench.store_baselines import RedisStore

        address, port = server.rsplit(":", 1)
        return RedisStore(address, int(port))
    if system == "mooncake":
        from mooncake.store import MooncakeDistributedStore

        store: Any = MooncakeDistributedStore()
        metadata = "P2PHANDSHAKE"
    elif system in ("kvcake", "kvcake-ha"):  # the HA master's clients are given etcd://
        from kvcake.store import DistributedStore

        store = DistributedStore()
        metadata = "p2p"
    else:
        raise KvcakeError(f"unknown system {system!r}")
    rc = store.setup(host, metadata, 0, LOCAL_BUFFER_BYTES, "tcp", "", server)
    if rc != 0:
        raise KvcakeError(f"{system} client setup against {server} failed with code {rc}")
    opened: StoreLike = store
    return opened


class Buffers:
    """Source (random bytes) and destination memory, pre-touched and registered."""

    def __init__(self, store: StoreLike, nbytes: int) -> None:
        self.nbytes = nbytes
        self._maps = [mmap.mmap(-1, nbytes), mmap.mmap(-1, nbytes)]
        self._maps[0][:] = os.urandom(nbytes)
        self._maps[1][:] = bytes(nbytes)
        self.src_ptr, self.dst_ptr = (ctypes.addressof(ctypes.c_char.from_buffer(m))
                                      for m in self._maps)
        for ptr in (self.src_ptr, self.dst_ptr):
            _check(store.register_buffer(ptr, nbytes), "register_buffer")

    def src(self, start: int, stop: int) -> bytes:
        return self._maps[0][start:stop]

    def dst(self, start: int, stop: int) -> bytes:
        return self._maps[1][start:stop]

    def clear_dst(self) -> None:
        self._maps[1][:] = bytes(self.nbytes)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise KvcakeError(f"{what} failed with code {rc}")


def _expect(rcs: Sequence[int], expected: int, what: str) -> int:
    """Raise unless every result equals ``expected``; return how many there were."""
    if any(rc != expected for rc in rcs):
        raise KvcakeError(f"{what} returned {list(rcs)[:8]}, expected {expected} each")
    return len(rcs)


def _timed(step: Step, min_seconds: float, max_steps: int) -> tuple[float, int, float]:
    """Objects per second over repeated ``step`` calls, how many calls ran, and the client's
    CPU seconds per object (all of this process's threads: a client that polls for its
    replies spends CPU where one that sleeps in ``recv`` does not)."""
    moved, steps, start, cpu = 0, 0, time.perf_counter(), time.process_time()
    while True:
        moved += step()
        steps += 1
        elapsed = time.perf_counter() - start
        if steps >= max_steps or elapsed >= min_seconds:
            return moved / elapsed, steps, (time.process_time() - cpu) / max(moved, 1)


class Driver:
    """Runs cases against one store; ``ws/SIZE/i`` keys are the read working sets."""

    def __init__(self, store: StoreLike, buffers: Buffers, plan: Plan) -> None:
        self.store, self.buffers, self.plan = store, buffers, plan
        self._written: set[str] = set()

    # -- steps: one timed call each -------------------------------------------------------

    def put_step(self, case: Case, keys: Iterator[str]) -> Step:
        store, size, batch, src = self.store, case.size, case.batch, self.buffers.src_ptr
        if case.op == "put":
            value = self.buffers.src(0, size)
            return lambda: _expect([store.put(next(keys), value)], 0, "put")
        if case.op == "put_from":
            return lambda: _expect([store.put_from(next(keys), src, size)], 0, "put_from")
        ptrs, sizes = [src + i * size for i in range(batch)], [size] * batch

        def batch_put() -> int:
            names = [next(keys) for _ in range(batch)]
            return _expect(store.batch_put_from(names, ptrs, sizes), 0, "batch_put_from")

        return batch_put

    def get_step(self, case: Case, keys: list[str]) -> Step:
        store, size, batch, dst = self.store, case.size, case.batch, self.buffers.dst_ptr
        if case.op == "get":
            return lambda: _expect([len(store.get(keys[0]))], size, "get")
        if case.op == "get_into":
            return lambda: _expect([store.get_into(keys[0], dst, size)], size, "get_into")
        ptrs, sizes = [dst + i * size for i in range(batch)], [size] * batch
        return lambda: _expect(store.batch_get_into(keys, ptrs, sizes), size, "batch_get_into")

    def exist_step(self, case: Case, keys: list[str]) -> Step:
        store = self.store
        if case.op == "batch_is_exist":
            return lambda: _expect(store.batch_is_exist(keys), 1, "batch_is_exist")
        keys_in_turn = itertools.cycle(keys)
        return lambda: _expect([store.is_exist(next(keys_in_turn))], 1, "is_exist")

    # -- one repetition of each kind -------------------------------------------------------

    def put_rep(self, case: Case, tag: str) -> tuple[float, float]:
        max_steps = max(1, self.plan.budget_bytes // (case.size * case.batch))
        keys = [f"{tag}/{i}" for i in range(max_steps * case.batch)]
        rate, steps, cpu = _timed(self.put_step(case, iter(keys)), self.plan.min_seconds,
                                  max_steps)
        for key in keys[: steps * case.batch]:
            _check(self.store.remove(key), "remove")
        return rate, cpu

    def working_set(self, size: int, count: int) -> list[str]:
        """``count`` objects of ``size`` bytes, object i holding source slot i."""
        keys = [f"ws/{size}/{i}" for i in range(count)]
        missing = [i for i, key in enumerate(keys) if key not in self._written]
        if missing:
            ptrs = [self.buffers.src_ptr + i * size for i in missing]
            names = [keys[i] for i in missing]
            _expect(self.store.batch_put_from(names, ptrs, [size] * len(missing)), 0,
                    "batch_put_from (working set)")
            self._written.update(names)
        return keys

    def exist_keys(self) -> list[str]:
        keys = [f"exist/{i}" for i in range(EXIST_KEYS)]
        for key in keys:
            if key not in self._written:
                _check(self.store.put(key, b"x" * 64), "put (exist keys)")
                self._written.add(key)
        return keys

    # -- a whole case ---------------------------------------------------------------------

    def measure(self, case: Case) -> dict[str, Any]:
        rep = self._rep_function(case)
        rep(-1)  # warm-up: connections, mappings, first touch of pool pages
        rates, cpus = zip(*(rep(i) for i in range(self.plan.reps)), strict=True)
        rate = statistics.median(rates)
        verify(self, case)
        return {"op": case.op, "size": case.size, "batch": case.batch, "ops_per_s": rate,
                "gbps": rate * case.size / 1e9 if case.size else None,
                "cpu_us": statistics.median(cpus) * 1e6}

    def _rep_function(self, case: Case) -> Callable[[int], tuple[float, float]]:
        tag = f"{case.op}/{case.size}/{case.batch}"
        if case.op in PUT_OPS:
            return lambda i: self.put_rep(case, f"{tag}/{i}")
        if case.op in GET_OPS:
            step = self.get_step(case, self.working_set(case.size, case.batch))
        else:
            step = self.exist_step(case, self.exist_keys()[: case.batch])

        def rep(_: int) -> tuple[float, float]:
            rate, _steps, cpu = _timed(step, self.plan.min_seconds, sys.maxsize)
            return rate, cpu

        return rep

    def prime(self, size: int) -> None:
        """Write and remove ``budget_bytes`` once, untimed, so no system's first put
        repetition pays for first-touching its pool (kvcake pre-touches at start-up)."""
        keys = [f"prime/{i}" for i in range(max(1, self.plan.budget_bytes // size))]
        for key in keys:
            _check(self.store.put_from(key, self.buffers.src_ptr, size), "put_from (prime)")
        for key in keys:
            _check(self.store.remove(key), "remove (prime)")


def verify(driver: Driver, case: Case) -> None:
    """Check once that this case's path moves the right bytes (not just the right count)."""
    store, buffers, size = driver.store, driver.buffers, case.size
    if case.op in EXIST_OPS:
        if store.is_exist("never/written") != 0 or store.batch_is_exist(["never/written"]) != [0]:
            raise KvcakeError("is_exist reports a key that was never written")
        return
    if case.op in GET_OPS:
        keys = driver.working_set(size, case.batch)
        buffers.clear_dst()
        driver.get_step(case, keys)()
        got = store.get(keys[0]) if case.op == "get" else buffers.dst(0, size * case.batch)
    else:
        keys = [f"verify/{case.op}/{size}/{case.batch}/{i}" for i in range(case.batch)]
        driver.put_step(case, iter(keys))()
        got = b"".join(store.get(key) for key in keys)  # leased now: left for remove_all
    if got != buffers.src(0, size * case.batch):
        raise KvcakeError(f"{case.op} {size} B x{case.batch}: bytes read back differ")


def run_client(system: str, server: str, host: str, plan: Plan, cases: list[Case]) -> None:
    store = open_store(system, server, host)
    try:
        buffers = Buffers(store, max((c.size * c.batch for c in cases), default=0) or 1 << 20)
        driver = Driver(store, buffers, plan)
        driver.prime(max((c.size for c in cases), default=0) or 1 << 20)
        for case in cases:
            print(json.dumps(driver.measure(case)), flush=True)
        store.remove_all()
    finally:
        store.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvcake.bench.store_driver")
    commands = parser.add_subparsers(dest="command", required=True)
    client = commands.add_parser("client", help="measure cases, one JSON line each")
    client.add_argument("--system", required=True,
                        choices=("kvcake", "kvcake-ha", "mooncake", "redis"))
    client.add_argument("--server", required=True, help="master (or Redis) HOST:PORT")
    client.add_argument("--host", required=True, help="this client's address")
    client.add_argument("--plan", required=True, help="JSON [reps, min_seconds, budget_bytes]")
    client.add_argument("--cases", required=True, help="JSON [[op, size, batch], ...]")
    node = commands.add_parser("mooncake-node", help="a Mooncake storage node")
    node.add_argument("--master", required=True)
    node.add_argument("--host", required=True)
    node.add_argument("--segment-size", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "mooncake-node":
        from kvcake.bench.store_baselines import serve_mooncake_node

        serve_mooncake_node(args.master, args.host, args.segment_size)
        return
    plan = Plan(*json.loads(args.plan))
    cases = [Case(*c) for c in json.loads(args.cases)]
    run_client(args.system, args.server, args.host, plan, cases)


if __name__ == "__main__":
    main()
