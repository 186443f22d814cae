"""``DistributedStore``: Mooncake's ``MooncakeDistributedStore``, its method names, argument
names and order, return codes and semantics, over kvcake's store.

Methods answer ints (0, a byte count or a count on success, a negative Mooncake code
otherwise); ``get`` answers ``b""`` and ``get_buffer`` ``None`` for a missing key. Bytes
values pass through the local buffer's budget (``local_buffer_size``,
:mod:`kvcake.store.compat.buffers`); raw addresses must be registered
(:mod:`kvcake.store.compat.zero_copy`). A put of a key that exists answers 0 and keeps the
stored value; ``upsert`` replaces it. Gets, exists, sizes and replica queries lease what they
find for the master's ``lease_ttl_s`` (Mooncake's ``default_kv_lease_ttl``): a ``remove``
within it answers ``OBJECT_HAS_LEASE``; puts lease nothing.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Mapping
from typing import Any

import msgspec

from kvcake.common.errors import InvalidParamsError, KvcakeError
from kvcake.common.log import get_logger
from kvcake.store.client import Buffer, as_view
from kvcake.store.compat.base import (
    ask_node,
    check_same_node,
    code_of,
    codes_of,
    first_error,
)
from kvcake.store.compat.descriptors import BufferHandle, ReplicaDescriptor
from kvcake.store.compat.options import (
    DEFAULT_LOCAL_BUFFER_BYTES,
    SetupOptions,
    options_from_dict,
    split_hostname,
)
from kvcake.store.compat.zero_copy import ZeroCopyApi
from kvcake.store.replicate import ReplicateConfig
from kvcake.transfer import TransferEngine
from kvcake.wire.store import Stats

log = get_logger(__name__)
_TENSOR_HEADER = struct.Struct("<I")


class _TensorMeta(msgspec.Struct, array_like=True):
    dtype: str
    shape: list[int]


class DistributedStore(ZeroCopyApi):
    """See the module docstring. ``close()`` before dropping it (or leave it to exit)."""

    # ----- lifecycle
    def setup(self, local_hostname: str | Mapping[str, Any] = "127.0.0.1",
              metadata_server: str = "p2p", global_segment_size: int = 0,
              local_buffer_size: int = DEFAULT_LOCAL_BUFFER_BYTES, protocol: str = "tcp",
              rdma_devices: str = "", master_server_addr: str = "127.0.0.1:50051",
              engine: TransferEngine | None = None, enable_ssd_offload: bool = False,
              ssd_offload_path: str = "", tenant_id: str = "",
              enable_client_http_server: bool = False, client_http_port: int = 9300, *,
              config: Mapping[str, Any] | None = None, tenant_token: str = "") -> int:
        """Join the master at ``master_server_addr`` as ``local_hostname`` (``host`` or
        ``host:port``, see :mod:`kvcake.store.compat.options`), contributing
        ``global_segment_size`` bytes (a segment named by the hostname) and staging bytes
        values through ``local_buffer_size`` bytes. Or ``setup(dict)`` /
        ``setup(config=dict)`` with the same names as keys and human-readable sizes.

        ``protocol``: ``tcp`` (same-host replicas are still read through shared memory),
        ``auto`` or ``shm``; kvcake has no RDMA. ``engine``: a kvcake ``TransferEngine`` to
        share (left open by ``close``). ``enable_ssd_offload``: the segment gets a disk tier
        in ``ssd_offload_path`` (its size from ``KVCAKE_STORE_DISK_CAPACITY``). Every key
        lives in tenant ``tenant_id`` (empty: ``KVCAKE_STORE_TENANT``, else ``default``),
        registered with ``tenant_token`` when the master asks for one. ``metadata_server``
        and ``rdma_devices`` are accepted and unused (segments are found through the
        master); kvcake clients have no HTTP server. 0, or the code setup failed with."""
        if enable_client_http_server:
            log.warning("kvcake store clients have no HTTP server; port %d stays closed",
                        client_http_port)
        try:
            if isinstance(local_hostname, Mapping) or config is not None:
                mapping = config if config is not None else local_hostname
                assert isinstance(mapping, Mapping)
                options = options_from_dict(mapping, tenant_token)
            else:
                options = SetupOptions(
                    local_hostname, global_segment_size, local_buffer_size, protocol,
                    master_server_addr, tenant_id, tenant_token,
                    ssd_offload_path if enable_ssd_offload else "")
        except InvalidParamsError as exc:
            log.error("store setup refused: %s", exc)
            return int(exc.code)
        return self._connect(options, engine)

    def setup_dummy(self, mem_pool_size: int, local_buffer_size: int,
                    server_address: str) -> int:
        """Attach to the local ``kvcake node`` whose control endpoint is ``server_address``
        (``kvcake node --control-port``), as Mooncake's dummy client attaches to its
        standalone store: the node's master and tenant (its token from
        ``KVCAKE_STORE_TENANT_TOKEN``), known by the node's segment name, contributing
        nothing itself. ``mem_pool_size`` (Mooncake's shared memory for
        ``alloc_from_mem_pool``) is accepted and unused: kvcake moves bytes from and to the
        caller's own memory. 0, or the code it failed with."""
        try:
            if mem_pool_size < 0:
                raise InvalidParamsError(f"mem_pool_size must be >= 0, got {mem_pool_size}")
            node = ask_node(server_address)
            host, _ = split_hostname(node.transfer)
            options = SetupOptions(host, 0, local_buffer_size, "tcp", node.master, node.tenant,
                                   known_as=node.segment)
        except KvcakeError as exc:
            log.error("setup_dummy against %s failed: %s", server_address, exc)
            return int(exc.code)
        return self._connect(options)

    # ----- bytes values
    def put(self, key: str, value: Buffer, config: ReplicateConfig | None = None) -> int:
        return self._put_values([key], [value], config, upsert=False)

    def put_batch(self, keys: list[str], values: list[Buffer],
                  config: ReplicateConfig | None = None) -> int:
        """0 when every key is stored, else the first failing key's code."""
        return self._put_values(keys, values, config, upsert=False)

    def put_parts(self, key: str, *parts: Buffer, config: ReplicateConfig | None = None) -> int:
        """Store the concatenation of ``parts`` under ``key`` (no bytes: nothing, and 0)."""
        value = b"".join(parts)
        return self._put_values([key], [value], config, upsert=False) if value else 0

    def upsert(self, key: str, value: Buffer, config: ReplicateConfig | None = None) -> int:
        """Store ``value`` under ``key``, replacing what is there (its hard pin and group
        carried over; ``config.soft_pin_action`` decides its soft pin)."""
        return self._put_values([key], [value], config, upsert=True)

    def upsert_batch(self, keys: list[str], values: list[Buffer],
                     config: ReplicateConfig | None = None) -> int:
        return self._put_values(keys, values, config, upsert=True)

    def upsert_parts(self, key: str, *parts: Buffer,
                     config: ReplicateConfig | None = None) -> int:
        value = b"".join(parts)
        return self._put_values([key], [value], config, upsert=True) if value else 0

    def _put_values(self, keys: list[str], values: list[Buffer],
                    config: ReplicateConfig | None, upsert: bool) -> int:
        def put() -> list[int]:
            self._check_setup()  # before the budget: not set up is the clearer answer
            check_same_node(config)
            if len(keys) != len(values):
                raise InvalidParamsError(f"{len(keys)} keys but {len(values)} values")
            views = [as_view(v) for v in values]
            with self._local.staged(sum(v.nbytes for v in views)):
                return self._block(self.native.ops.put_parts(
                    keys, [[v] for v in views], config, upsert, pipeline_end=True))
        return first_error(codes_of(put, max(1, len(keys))))

    def get(self, key: str, /) -> bytes:
        """The value, or ``b""`` when it is missing (or cannot be read)."""
        return self.get_batch([key])[0]

    def get_batch(self, keys: list[str], /) -> list[bytes]:
        values = self._get_values(keys)
        return [v if isinstance(v, bytes) else b"" for v in values]

    def get_buffer(self, key: str) -> BufferHandle | None:
        """The value in a buffer (``.size()``, the buffer protocol), ``None`` when missing."""
        return self.batch_get_buffer([key])[0]

    def batch_get_buffer(self, keys: list[str]) -> list[BufferHandle | None]:
        return [BufferHandle(v) if isinstance(v, bytes) else None
                for v in self._get_values(keys)]

    def _get_values(self, keys: list[str]) -> list[bytes | int]:
        try:
            return self._block(self.native.ops.get_values(keys, self._local))
        except KvcakeError as exc:
            log.debug("store get failed: %s", exc)
            return [int(exc.code)] * len(keys)

    # ----- metadata and removal
    def is_exist(self, key: str) -> int:
        """1 present, 0 absent, a negative code on error."""
        return self.batch_is_exist([key])[0]

    def batch_is_exist(self, keys: list[str]) -> list[int]:
        return codes_of(lambda: self._block(self.native.ops.exist(keys)), len(keys))

    def isExist(self, key: str) -> int:  # noqa: N802 - the C++ client's name
        """``is_exist`` under the name of Mooncake's C++ ``PyClient::isExist``, which Mooncake's
        own ``store_kv_bench.py`` calls (Mooncake's binding itself only has ``is_exist``)."""
        return self.is_exist(key)

    def get_size(self, key: str) -> int:
        return code_of(lambda: self._block(self.native.ops.sizes([key]))[0])

    def remove(self, key: str, force: bool = False) -> int:
        return code_of(lambda: self._block(self.native.ops.remove([key], force))[0])

    def batch_remove(self, keys: list[str], force: bool = False) -> list[int]:
        return codes_of(lambda: self._block(self.native.ops.remove(keys, force)), len(keys))

    def remove_by_regex(self, regex_pattern: str, force: bool = False) -> int:
        """How many keys matching ``regex_pattern`` (Python ``re``, anywhere in the key)
        went, or a code; leased ones stay unless ``force``."""
        return code_of(lambda: self._block(self.native.ops.remove_by_regex(regex_pattern, force)))

    def remove_all(self, force: bool = False) -> int:
        return code_of(lambda: self._block(self.native.ops.remove_all(force)))

    def batch_replica_clear(self, keys: list[str], segment_name: str = "") -> list[str]:
        """Drop this client's own objects among ``keys`` whose lease has run out: all their
        replicas, or only those on the segment named ``segment_name``; the keys dropped."""
        try:
            return self._block(self.native.ops.replica_clear(keys, segment_name))
        except KvcakeError as exc:
            log.error("batch_replica_clear failed: %s", exc)
            return []

    def get_replica_desc(self, key: str) -> list[ReplicaDescriptor]:
        """The readable replicas of ``key`` (leased, as a get); ``[]`` when missing."""
        return self.batch_get_replica_desc([key]).get(key, [])

    def batch_get_replica_desc(self, keys: list[str]) -> dict[str, list[ReplicaDescriptor]]:
        """The replicas of each key found (missing keys are left out)."""
        try:
            reply = self._block(self.native.ops.query_replicas(keys))
        except KvcakeError as exc:
            log.error("batch_get_replica_desc failed: %s", exc)
            return {}
        return {key: [ReplicaDescriptor(info) for info in infos]
                for key, code, infos in zip(keys, reply.codes, reply.replicas, strict=True)
                if code == 0}

    def stats(self) -> Stats:
        """The master's counters (kvcake's addition; raises when the master is down)."""
        return self._block(self.native.ops.stats())

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
