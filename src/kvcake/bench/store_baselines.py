"""The other systems of ``kvcake bench store``: Redis behind Mooncake's store API, and the
pieces needed to run the real Mooncake store (its master binary, a storage-node process).

``RedisStore`` speaks the same method names and return codes as ``MooncakeDistributedStore``
(0 ok, negative error code, ``get`` gives ``b""`` when missing), so one driver measures all
three systems with the same calls. Batches map onto Redis' own batching, whichever measured
faster here: a pipeline of SETs (about twice MSET's rate), MGET, and a pipeline of EXISTS.
A "get into" is MGET/GET and then a copy into the caller's buffer; that copy is part of what
Redis costs a caller who wants the bytes in place, so it is timed.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from kvcake.common.errors import ErrorCode, KvcakeError
from kvcake.common.lifespan import StopSignals

REDIS_SERVER_HINT = "--against redis needs redis-server: apt-get install -y redis-server"
REDIS_PY_HINT = "--against redis needs redis-py with hiredis: pip install 'kvcake[redis]'"
MOONCAKE_HINT = (
    "--against mooncake needs Mooncake's wheel: pip install mooncake-transfer-engine-non-cuda "
    "(and apt-get install libibverbs1 librdmacm1)"
)
_NOT_FOUND = int(ErrorCode.OBJECT_NOT_FOUND)


def check_available(system: str) -> None:
    """Raise ``KvcakeError`` with the install hint when ``system`` cannot run here."""
    if system == "redis":
        if shutil.which("redis-server") is None:
            raise KvcakeError(REDIS_SERVER_HINT)
        if any(importlib.util.find_spec(name) is None for name in ("redis", "hiredis")):
            raise KvcakeError(REDIS_PY_HINT)
    elif system == "mooncake":
        mooncake_master_binary()
    elif system == "kvcake-ha" and shutil.which("etcd") is None:
        raise KvcakeError("--against kvcake-ha needs etcd: apt-get install -y etcd-server")


def mooncake_master_binary() -> str:
    """The ``mooncake_master`` executable shipped inside the wheel."""
    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        raise KvcakeError(MOONCAKE_HINT)
    for folder in [*spec.submodule_search_locations, str(Path(sys.executable).parent)]:
        binary = Path(folder) / "mooncake_master"
        if binary.is_file():
            return str(binary)
    raise KvcakeError(f"mooncake_master not found next to the wheel; {MOONCAKE_HINT}")


def _view(buffer_ptr: int, size: int) -> memoryview:
    """A writable byte view of ``size`` bytes at address ``buffer_ptr`` (no copy)."""
    return memoryview((ctypes.c_char * size).from_address(buffer_ptr)).cast("B")


class RedisStore:
    """redis-py (with hiredis) behind Mooncake's store method names and return codes."""

    def __init__(self, host: str, port: int) -> None:
        redis: Any = importlib.import_module("redis")  # optional extra, loaded on demand
        self._redis: Any = redis.Redis(host=host, port=port)
        self._redis.ping()

    def register_buffer(self, buffer_ptr: int, size: int) -> int:
        return 0  # Redis has no registration; buffers are plain memory

    def put(self, key: str, value: bytes) -> int:
        self._redis.set(key, value)
        return 0

    def get(self, key: str) -> bytes:
        value: bytes | None = self._redis.get(key)
        return value if value is not None else b""

    def put_from(self, key: str, buffer_ptr: int, size: int) -> int:
        self._redis.set(key, _view(buffer_ptr, size))
        return 0

    def get_into(self, key: str, buffer_ptr: int, size: int) -> int:
        return _copy_into(self._redis.get(key), buffer_ptr, size)

    def batch_put_from(self, keys: list[str], buffer_ptrs: list[int],
                       sizes: list[int]) -> list[int]:
        pipe = self._redis.pipeline(transaction=False)  # measured here: ~2x MSET's rate
        for key, ptr, size in zip(keys, buffer_ptrs, sizes, strict=True):
            pipe.set(key, _view(ptr, size))
        pipe.execute()
        return [0] * len(keys)

    def batch_get_into(self, keys: list[str], buffer_ptrs: list[int],
                       sizes: list[int]) -> list[int]:
        values = self._redis.mget(keys)
        return [_copy_into(value, ptr, size)
                for value, ptr, size in zip(values, buffer_ptrs, sizes, strict=True)]

    def is_exist(self, key: str) -> int:
        return 1 if self._redis.exists(key) else 0

    def batch_is_exist(self, keys: list[str]) -> list[int]:
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        return [1 if found else 0 for found in pipe.execute()]

    def remove(self, key: str) -> int:
        return 0 if self._redis.delete(key) else _NOT_FOUND

    def remove_all(self) -> int:
        self._redis.flushdb()
        return 0

    def close(self) -> int:
        self._redis.close()
        return 0


def _copy_into(value: bytes | None, buffer_ptr: int, size: int) -> int:
    if value is None:
        return _NOT_FOUND
    if len(value) > size:
        return int(ErrorCode.BUFFER_OVERFLOW)
    _view(buffer_ptr, len(value))[:] = value
    return len(value)


def serve_mooncake_node(master: str, host: str, segment_size: int) -> None:
    """A Mooncake storage node: mount ``segment_size`` bytes, print ``mounted``, and hold
    them until SIGTERM or standard input closes. Retries while the master starts."""
    from mooncake.store import MooncakeDistributedStore

    deadline = time.monotonic() + 20.0
    while True:
        store = MooncakeDistributedStore()
        rc = store.setup(host, "P2PHANDSHAKE", segment_size, 16 << 20, "tcp", "", master)
        if rc == 0:
            break
        if time.monotonic() > deadline:
            raise KvcakeError(f"Mooncake storage node setup failed with code {rc}")
        time.sleep(0.2)
    print(f"mounted {segment_size} bytes on {host}", flush=True)
    stop = StopSignals(signums=(signal.SIGTERM,))
    stop.stop_on_end_of_input()
    stop.wait()
    store.close()
