"""The methods that take raw addresses: registered buffers, ``*_from`` / ``*_into``, values
split over several buffers (``*_multi_buffers``, as vLLM's ``MooncakeStoreConnector`` uses
them) and ranged reads (``get_into_ranges``). Every address must lie inside a buffer given to
``register_buffer``."""

from __future__ import annotations

from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError
from kvcake.store.compat import ranges
from kvcake.store.compat.base import StoreBase, check_same_node, code_of, codes_of, read_code
from kvcake.store.replicate import ReplicateConfig

_BAD = int(ErrorCode.INVALID_PARAMS)


class ZeroCopyApi(StoreBase):
    # ----- registration
    def register_buffer(self, buffer_ptr: int, size: int) -> int:
        return code_of(lambda: self._buffers.register(buffer_ptr, size))

    def unregister_buffer(self, buffer_ptr: int) -> int:
        return code_of(lambda: self._buffers.unregister(buffer_ptr))

    # ----- writes
    def put_from(self, key: str, buffer_ptr: int, size: int,
                 config: ReplicateConfig | None = None) -> int:
        return self.batch_put_from([key], [buffer_ptr], [size], config)[0]

    def batch_put_from(self, keys: list[str], buffer_ptrs: list[int], sizes: list[int],
                       config: ReplicateConfig | None = None) -> list[int]:
        """0 per key stored (or already there), else its code; lists of different lengths
        fail every key with ``INVALID_PARAMS``."""
        return self._put_pieces(keys, buffer_ptrs, sizes, config, upsert=False)

    def upsert_from(self, key: str, buffer_ptr: int, size: int,
                    config: ReplicateConfig | None = None) -> int:
        return self.batch_upsert_from([key], [buffer_ptr], [size], config)[0]

    def batch_upsert_from(self, keys: list[str], buffer_ptrs: list[int], sizes: list[int],
                          config: ReplicateConfig | None = None) -> list[int]:
        return self._put_pieces(keys, buffer_ptrs, sizes, config, upsert=True)

    def _put_pieces(self, keys: list[str], buffer_ptrs: list[int], sizes: list[int],
                    config: ReplicateConfig | None, upsert: bool) -> list[int]:
        if not len(keys) == len(buffer_ptrs) == len(sizes):
            return [_BAD] * len(keys)
        if not keys:
            return []

        def put() -> list[int]:
            check_same_node(config)
            views = self._buffers.views(buffer_ptrs, sizes)
            return self._block(self.native.ops.put_parts(keys, [[v] for v in views], config,
                                                         upsert, pipeline_end=True))
        return codes_of(put, len(keys))

    def batch_put_from_multi_buffers(self, keys: list[str], all_buffer_ptrs: list[list[int]],
                                     all_sizes: list[list[int]],
                                     config: ReplicateConfig | None = None) -> list[int]:
        """Store each key's value: its buffers' bytes one after another. 0 per key, else
        its code (``INVALID_PARAMS`` for every key when the lists' lengths disagree, or
        ``prefer_alloc_in_same_node`` comes with more than one replica)."""
        if not len(keys) == len(all_buffer_ptrs) == len(all_sizes) or any(
                len(p) != len(s) for p, s in zip(all_buffer_ptrs, all_sizes, strict=True)):
            return [_BAD] * len(keys)
        if not keys:
            return []

        def put() -> list[int]:
            if config is not None and config.prefer_alloc_in_same_node \
                    and config.replica_num != 1:
                raise InvalidParamsError("prefer_alloc_in_same_node needs replica_num 1")
            parts = [self._buffers.views(p, s) for p, s in zip(all_buffer_ptrs, all_sizes,
                                                                strict=True)]
            return self._block(self.native.ops.put_parts(keys, parts, config,
                                                         pipeline_end=True))
        return codes_of(put, len(keys))

    # ----- reads
    def get_into(self, key: str, buffer_ptr: int, size: int) -> int:
        """Bytes read, or a code (``INVALID_PARAMS`` when ``size`` is too small). A key the
        master's location table holds is read right here, a lookup and one copy, except
        when its lease is due to be renewed (the first read, then once per half lease)."""
        read = self._get_into_here(key, buffer_ptr, size)
        return self.batch_get_into([key], [buffer_ptr], [size])[0] if read is None else read

    def _get_into_here(self, key: str, buffer_ptr: int, size: int) -> int | None:
        """:meth:`StoreOps.get_into_here` (``None``: take the batch path, which also says
        what was wrong with the call)."""
        store = self._store
        if store is None:
            return None
        try:
            read = store.ops.get_into_here(key, self._buffers.view(buffer_ptr, size))
        except KvcakeError:
            return None
        return None if read is None else read_code(read)

    def batch_get_into(self, keys: list[str], buffer_ptrs: list[int],
                       sizes: list[int]) -> list[int]:
        if not len(keys) == len(buffer_ptrs) == len(sizes):
            return [_BAD] * len(keys)
        return self.batch_get_into_multi_buffers(keys, [[p] for p in buffer_ptrs],
                                                 [[s] for s in sizes])

    def batch_get_into_multi_buffers(self, keys: list[str], all_buffer_ptrs: list[list[int]],
                                     all_sizes: list[list[int]],
                                     prefer_alloc_in_same_node: bool = False) -> list[int]:
        """Read each key's value into its buffers in order (the last ones may stay unused);
        bytes read per key, or a code (``INVALID_PARAMS`` when they hold less than the
        value, or the lists' lengths disagree). ``prefer_alloc_in_same_node`` changes
        nothing here: same-host replicas are always read first."""
        if not len(keys) == len(all_buffer_ptrs) == len(all_sizes) or any(
                len(p) != len(s) for p, s in zip(all_buffer_ptrs, all_sizes, strict=True)):
            return [_BAD] * len(keys)
        if not keys:
            return []

        def get() -> list[int]:
            parts = [self._buffers.views(p, s) for p, s in zip(all_buffer_ptrs, all_sizes,
                                                                strict=True)]
            return self._block(self.native.ops.get_into_parts(keys, parts))
        return [read_code(c) for c in codes_of(get, len(keys))]

    def get_into_ranges(self, buffer_ptrs: list[int], all_keys: list[list[str]],
                        all_dst_offsets: list[list[list[int]]],
                        all_src_offsets: list[list[list[int]]],
                        all_sizes: list[list[list[int]]]) -> list[list[list[int]]]:
        """Byte ranges of values into registered buffers, buffer-major; see
        :mod:`kvcake.store.compat.ranges` for the nesting and the codes."""
        results = ranges.skeleton(len(buffer_ptrs), all_keys, all_dst_offsets)
        plan = ranges.plan(buffer_ptrs, all_keys, all_dst_offsets, all_src_offsets, all_sizes,
                           self._buffers.capacity)
        if not plan.rows:
            return results
        keys = sorted({key for _, _, key in plan.rows})
        probes = [(key, 0, memoryview(b"")) for key in keys]  # each key's own code
        reads = [(r.key, r.src, self._buffers.view(buffer_ptrs[r.i] + r.dst, r.size)
                  if r.size else memoryview(b"")) for r in plan.reads]
        outcomes = codes_of(lambda: self._block(self.native.ops.read_ranges(probes + reads)),
                            len(probes) + len(reads))
        key_codes = dict(zip(keys, outcomes, strict=False))
        return ranges.fill(results, plan, outcomes[len(probes):], key_codes)
