"""``DistributedStore``: Mooncake's ``MooncakeDistributedStore`` API, names and semantics.

A Mooncake user switches by changing the import::

    from kvcake.store import DistributedStore as MooncakeDistributedStore, ReplicateConfig

Like Mooncake's, methods answer ints (0 or a byte count on success, a negative error code
otherwise), ``get`` answers ``b""`` for a missing key, and the ``*_from`` / ``*_into``
methods take raw addresses that must lie inside a buffer given to :meth:`register_buffer`.
Underneath runs the asyncio :class:`AsyncStore` on its own loop thread.
"""

from __future__ import annotations

import bisect
import ctypes
import struct
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import msgspec

from kvcake.common.aio import LoopThread
from kvcake.common.config import load_config
from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError
from kvcake.common.log import get_logger
from kvcake.store.client import AsyncStore, Buffer, as_view
from kvcake.store.config import StoreConfig
from kvcake.transfer import TransferEngine
from kvcake.transfer.config import TransferConfig
from kvcake.wire.store import ReplicateConfig, Stats

log = get_logger(__name__)
T = TypeVar("T")
_TENSOR_HEADER = struct.Struct("<I")
_SCRATCH_BYTES = 16 << 20  # Mooncake's default local_buffer_size


class _TensorMeta(msgspec.Struct, array_like=True):
    dtype: str
    shape: list[int]


class DistributedStore:
    def __init__(self) -> None:
        self._engine: TransferEngine | None = None
        self._io: LoopThread | None = None
        self._store: AsyncStore | None = None
        self._buffers: list[tuple[int, int]] = []  # sorted (address, size)

    # ----- lifecycle
    def setup(self, local_hostname: str = "127.0.0.1", metadata_server: str = "p2p",
              global_segment_size: int = 0, local_buffer_size: int = 0,
              protocol: str = "tcp", rdma_devices: str = "",
              master_server_addr: str = "127.0.0.1:50051", *, tenant_id: str = "",
              tenant_token: str = "") -> int:
        """Connect to the master at ``master_server_addr`` and contribute
        ``global_segment_size`` bytes. ``protocol`` ``tcp`` reaches remote replicas over TCP
        and same-host ones through shared memory; ``metadata_server``, ``local_buffer_size``
        and ``rdma_devices`` are accepted for compatibility (segments are found through the
        master). Every key lives in tenant ``tenant_id`` (empty: ``KVCAKE_STORE_TENANT``, else
        ``default``), registered with ``tenant_token`` when the master asks for one."""
        if self._store is not None:
            return int(ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
        engine = None
        try:
            config, transfer = _configs(local_hostname, global_segment_size, protocol,
                                        master_server_addr, tenant_id, tenant_token)
            engine = TransferEngine(transfer)
            store = AsyncStore(config, transfer, engine, local_buffer_size or _SCRATCH_BYTES)
            engine.io.run(store.setup())  # the store runs on the engine's own loop thread
        except KvcakeError as exc:
            log.error("store setup failed: %s", exc)
            if engine is not None:
                engine.close()
            return int(exc.code)
        self._engine, self._io, self._store = engine, engine.io, store
        return 0

    def close(self) -> int:
        if self._store is not None and self._io is not None:
            self._io.run(self._store.close())
        if self._engine is not None:
            self._engine.close()
        self._store = self._io = self._engine = None
        return 0

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._store is None or self._io is None:
            coro.close()
            raise KvcakeError("store is not set up", ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
        return self._io.run(coro)

    @property
    def native(self) -> AsyncStore:
        """The asyncio client underneath (for callers that also want its richer API)."""
        if self._store is None:
            raise KvcakeError("store is not set up", ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
        return self._store

    # ----- bytes values
    def put(self, key: str, value: Buffer, config: ReplicateConfig | None = None) -> int:
        return _code(lambda: self._run(self.native.put(key, value, config)))

    def put_batch(self, keys: list[str], values: list[Buffer],
                  config: ReplicateConfig | None = None) -> int:
        codes = _codes(lambda: self._run(self.native.put_batch(keys, values, config)), keys)
        return next((c for c in codes if c < 0), 0)

    def get(self, key: str) -> bytes:
        try:
            return self._run(self.native.get(key))
        except KvcakeError:
            return b""

    def get_batch(self, keys: list[str]) -> list[bytes]:
        try:
            values = self._run(self.native.get_batch(keys))
            return [v if isinstance(v, bytes) else b"" for v in values]
        except KvcakeError:
            return [b""] * len(keys)

    # ----- registered buffers
    def register_buffer(self, buffer_ptr: int, size: int) -> int:
        if buffer_ptr <= 0 or size <= 0:
            return int(ErrorCode.INVALID_PARAMS)
        bisect.insort(self._buffers, (buffer_ptr, size))
        return 0

    def unregister_buffer(self, buffer_ptr: int) -> int:
        for index, (address, _) in enumerate(self._buffers):
            if address == buffer_ptr:
                del self._buffers[index]
                return 0
        return int(ErrorCode.INVALID_PARAMS)

    def _view(self, buffer_ptr: int, size: int) -> memoryview:
        index = bisect.bisect_right(self._buffers, (buffer_ptr, float("inf"))) - 1
        if size <= 0 or index < 0:
            raise InvalidParamsError(f"buffer {buffer_ptr:#x}+{size} is not registered")
        address, length = self._buffers[index]
        if buffer_ptr + size > address + length:
            raise InvalidParamsError(f"buffer {buffer_ptr:#x}+{size} is not inside a "
                                     "registered buffer (call register_buffer first)")
        return memoryview((ctypes.c_ubyte * size).from_address(buffer_ptr)).cast("B")

    def put_from(self, key: str, buffer_ptr: int, size: int,
                 config: ReplicateConfig | None = None) -> int:
        return _code(lambda: self._run(
            self.native.put_from(key, self._view(buffer_ptr, size), config)))

    def get_into(self, key: str, buffer_ptr: int, size: int) -> int:
        return _code(lambda: self._run(self.native.get_into(key, self._view(buffer_ptr, size))))

    def batch_put_from(self, keys: list[str], buffer_ptrs: list[int], sizes: list[int],
                       config: ReplicateConfig | None = None) -> list[int]:
        return _codes(lambda: self._run(self.native.batch_put_from(
            keys, self._views(buffer_ptrs, sizes), config)), keys)

    def batch_get_into(self, keys: list[str], buffer_ptrs: list[int],
                       sizes: list[int]) -> list[int]:
        return _codes(lambda: self._run(self.native.batch_get_into(
            keys, self._views(buffer_ptrs, sizes))), keys)

    def _views(self, buffer_ptrs: Sequence[int], sizes: Sequence[int]) -> list[memoryview]:
        if len(buffer_ptrs) != len(sizes):
            raise InvalidParamsError(f"{len(buffer_ptrs)} buffers but {len(sizes)} sizes")
        return [self._view(p, s) for p, s in zip(buffer_ptrs, sizes, strict=True)]

    # ----- metadata
    def is_exist(self, key: str) -> int:
        return self.batch_is_exist([key])[0]

    def batch_is_exist(self, keys: list[str]) -> list[int]:
        return _codes(lambda: self._run(self.native.batch_is_exist(keys)), keys)

    def get_size(self, key: str) -> int:
        return _code(lambda: self._run(self.native.get_size(key)))

    def remove(self, key: str, force: bool = False) -> int:
        return _code(lambda: self._run(self.native.remove(key, force)))

    def remove_all(self, force: bool = False) -> int:
        return _code(lambda: self._run(self.native.remove_all(force)))

    def stats(self) -> Stats:
        """The master's counters (kvcake's addition; raises when the master is down)."""
        return self._run(self.native.stats())

    # ----- tensors (needs torch)
    def put_tensor(self, key: str, tensor: Any, config: ReplicateConfig | None = None) -> int:
        """Store a tensor's dtype, shape and bytes (it is copied to CPU, contiguous)."""
        flat = tensor.detach().to("cpu").contiguous()
        meta = msgspec.msgpack.encode(_TensorMeta(str(flat.dtype).removeprefix("torch."),
                                                  list(flat.shape)))
        nbytes = flat.numel() * flat.element_size()
        raw = (ctypes.c_ubyte * nbytes).from_address(flat.data_ptr())  # no numpy needed
        value = b"".join((_TENSOR_HEADER.pack(len(meta)), meta, memoryview(raw).cast("B")))
        return self.put(key, value, config)

    def get_tensor(self, key: str) -> Any:
        """The tensor stored under ``key``, or ``None`` when it is missing."""
        import torch

        value = self.get(key)
        if not value:
            return None
        (meta_len,) = _TENSOR_HEADER.unpack_from(value)
        start = _TENSOR_HEADER.size + meta_len
        meta = msgspec.msgpack.decode(value[_TENSOR_HEADER.size : start], type=_TensorMeta)
        data = torch.frombuffer(bytearray(value[start:]), dtype=torch.uint8)
        return data.view(getattr(torch, meta.dtype)).reshape(meta.shape)


def _configs(host: str, segment_size: int, protocol: str, master: str, tenant: str = "",
             tenant_token: str = "") -> tuple[StoreConfig, TransferConfig]:
    if protocol not in ("tcp", "auto", "shm"):
        raise InvalidParamsError(f"protocol must be tcp, auto or shm, got {protocol!r}")
    transfer = load_config(TransferConfig, "transfer", {
        "host": host, "transport": None if protocol == "tcp" else protocol})
    config = load_config(StoreConfig, "store", {"master": master, "segment_size": segment_size,
                                                "tenant": tenant or None,
                                                "tenant_token": tenant_token or None})
    return config, transfer


def _code(action: Any) -> int:
    try:
        result = action()
    except KvcakeError as exc:
        log.debug("store call failed: %s", exc)
        return int(exc.code)
    return int(result) if isinstance(result, int) else 0


def _codes(action: Any, keys: Sequence[str]) -> list[int]:
    try:
        return [int(c) for c in action()]
    except KvcakeError as exc:
        log.debug("store batch call failed: %s", exc)
        return [int(exc.code)] * len(keys)


__all__ = ["DistributedStore", "ReplicateConfig", "as_view"]
