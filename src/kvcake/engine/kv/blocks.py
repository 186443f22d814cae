"""A block's bytes where they live in a paged KV cache, one tensor per layer indexed by block
id (kvcake's engine: :func:`paged_layers`; vLLM-CPU's per-layer caches): copied in and out
whole, or in layer by layer (:class:`LayeredCopy`) while a forward pass already runs on the
first layers::

    record payload   [layer 0 | layer 1 | ... | layer L-1]      (runs: K, V or one run)
                         |         |                 |
    paged cache      layers[0][b] layers[1][b] ... layers[L-1][b]
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from collections.abc import Sequence

import torch
import xxhash

from kvcake.engine.kv.format import payload_digest

_SMALL_RUN = 64 * 1024  # bytes: a block's runs below this are copied on the engine's thread


def paged_layers(kv_cache: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """kvcake's KV cache ``(num_layers, 2, num_slots, num_kv_heads, head_dim)`` as one view
    per layer indexed by block: ``(num_blocks, 2, block_size, num_kv_heads, head_dim)``."""
    num_layers, _, num_slots = kv_cache.shape[:3]
    blocks = kv_cache.view(num_layers, 2, num_slots // block_size, block_size,
                           *kv_cache.shape[3:])
    return list(blocks.transpose(1, 2).unbind(0))


class BlockBytes:
    """Block ``b``'s bytes in per-layer tensors indexed by block: every layer's ``layer[b]``,
    in layer order, each split into its contiguous runs (kvcake's engine: K and V; vLLM-CPU:
    one run), as memoryviews over the tensors' own memory (no copy); and a block's whole
    payload copied in (run by run) or out (in one strided copy where the layers are evenly
    spaced views of one tensor, as kvcake's engine's and vLLM-CPU's are)."""

    def __init__(self, layers: Sequence[torch.Tensor]) -> None:
        self._spans = [_memory(layer) for layer in layers]
        self._bases = [layer.data_ptr() for layer in layers]
        self._strides = [layer.stride(0) * layer.element_size() for layer in layers]
        self._runs = [_runs(layer[0], layer.data_ptr()) for layer in layers]
        self._layer_at = list(itertools.accumulate(  # each layer's offset in a payload
            (sum(size for _, size in runs) for runs in self._runs), initial=0))
        self._stacked = _stacked(layers)
        self._block_shape = (len(layers), *layers[0].shape[1:])
        self._dtype = layers[0].dtype

    @property
    def small_runs(self) -> bool:
        """Whether a block's runs are so small (kvcake's 16-token K and V: 6 KiB) that
        copying them one by one on helper threads costs more in GIL hand-offs than in bytes:
        then the engine's thread copies each block in one strided copy (:meth:`copy_in`)."""
        return self._stacked is not None and min(
            size for runs in self._runs for _, size in runs) < _SMALL_RUN

    def copy_in(self, block_id: int, payload: memoryview) -> None:
        """Write a record's payload (every layer's block, in order) into block ``block_id``,
        on the engine's thread: one strided torch copy where the layers are stacked."""
        if self._stacked is not None:
            self._stacked[:, block_id].copy_(self._as_block(payload))
            return
        self.memmove_in(block_id, payload)

    def memmove_in(self, block_id: int, payload: memoryview,
                   digest: xxhash.xxh3_64 | None = None) -> None:
        """:meth:`copy_in` run by run with ``memmove``: safe on any thread (a torch copy on a
        thread torch does not otherwise use starts a thread pool there, which then competes
        with the engine's for the cores). With ``digest``, each run is hashed into it right
        after its copy, while it is still in the CPU's cache: memory is read once."""
        source = _address(payload)
        for layer in range(self.num_layers):
            self._memmove_layer(block_id, layer, payload, source, digest)

    def copy_out(self, block_id: int, payload: memoryview) -> None:
        """Write block ``block_id`` into ``payload``, in record order (on the engine's
        thread: one strided torch copy where the layers are stacked)."""
        if self._stacked is not None:
            self._as_block(payload).copy_(self._stacked[:, block_id])
            return
        at = 0
        for view in self.views(block_id):
            payload[at:at + view.nbytes] = view
            at += view.nbytes

    def _as_block(self, payload: memoryview) -> torch.Tensor:
        return torch.frombuffer(payload, dtype=self._dtype).view(self._block_shape)

    @property
    def num_layers(self) -> int:
        return len(self._runs)

    @property
    def payload_bytes(self) -> int:
        """A record's payload: every layer's bytes of one block."""
        return self._layer_at[-1]

    def memmove_layer_in(self, block_id: int, layer: int, payload: memoryview,
                         digest: xxhash.xxh3_64 | None = None) -> None:
        """Layer ``layer`` of a record's payload into block ``block_id``, run by run with
        ``memmove``, each run hashed into ``digest`` (if given) right after its copy."""
        self._memmove_layer(block_id, layer, payload, _address(payload), digest)

    def _memmove_layer(self, block_id: int, layer: int, payload: memoryview, source: int,
                       digest: xxhash.xxh3_64 | None) -> None:
        start = self._bases[layer] + block_id * self._strides[layer]
        at = self._layer_at[layer]
        for offset, size in self._runs[layer]:
            ctypes.memmove(start + offset, source + at, size)
            if digest is not None:
                digest.update(payload[at:at + size])
            at += size

    def views(self, block_id: int) -> list[memoryview]:
        views = []
        for span, stride, runs in zip(self._spans, self._strides, self._runs, strict=True):
            at = block_id * stride
            views += [span[at + offset:at + offset + size] for offset, size in runs]
        return views


def _address(payload: memoryview) -> int:
    """Where ``payload``'s bytes start in memory."""
    return ctypes.addressof(ctypes.c_char.from_buffer(payload))


def _stacked(layers: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The layers as one ``(num_layers, *layer.shape)`` view, where they are evenly spaced
    views of one storage with equal shapes and strides (``None`` otherwise)."""
    first = layers[0]
    step = (layers[1].data_ptr() - first.data_ptr()) if len(layers) > 1 else 0
    size = first.element_size()
    if step <= 0 or step % size or any(
            layer.data_ptr() - first.data_ptr() != i * step or layer.shape != first.shape
            or layer.stride() != first.stride() or layer.untyped_storage().data_ptr()
            != first.untyped_storage().data_ptr() for i, layer in enumerate(layers)):
        return None
    return first.as_strided((len(layers), *first.shape), (step // size, *first.stride()))


def _memory(tensor: torch.Tensor) -> memoryview:
    """The bytes from ``tensor``'s first element to its last (it must outlive the view)."""
    span = 1 + sum((n - 1) * step for n, step in zip(tensor.shape, tensor.stride(), strict=True))
    size = span * tensor.element_size()
    return memoryview((ctypes.c_ubyte * size).from_address(tensor.data_ptr())).cast("B")


def _runs(tensor: torch.Tensor, base: int) -> list[tuple[int, int]]:
    """``(byte offset from base, bytes)`` of ``tensor``'s contiguous runs, in element order."""
    if tensor.is_contiguous():
        return [(tensor.data_ptr() - base, tensor.numel() * tensor.element_size())]
    runs: list[tuple[int, int]] = []
    for part in tensor.unbind(0):
        for offset, size in _runs(part, base):
            if runs and runs[-1][0] + runs[-1][1] == offset:  # adjacent: one run
                runs[-1] = (runs[-1][0], runs[-1][1] + size)
            else:
                runs.append((offset, size))
    return runs


class LayeredCopy:
    """Records copied into their blocks layer by layer, layer 0 of every block first, by
    :meth:`run` on a helper thread; :meth:`wait` returns once a layer of every block is in
    place (the forward pass's attention for that layer may then read it), :meth:`result`
    once all are, with whether each record's payload matched its checksum (hashed on the
    way, run by run in record order, so a record is checked once its last layer landed).
    A copy that failed on its thread reports every record as bad, and never leaves a
    waiter hanging."""

    def __init__(self, blocks: BlockBytes, block_ids: Sequence[int],
                 payloads: Sequence[memoryview], checksums: Sequence[int]) -> None:
        wrong = [p.nbytes for p in payloads if p.nbytes != blocks.payload_bytes]
        if wrong:  # memmove would read past it
            raise ValueError(f"record payloads of {wrong[0]} bytes, expected "
                             f"{blocks.payload_bytes}")
        self._blocks = blocks
        self._jobs = list(zip(block_ids, payloads, checksums, strict=True))
        self._landed = 0  # layers in place in every block
        self._ready = threading.Condition()
        self._ok = [False] * len(self._jobs)

    def run(self) -> None:
        digests = [payload_digest() for _ in self._jobs]
        try:
            for layer in range(self._blocks.num_layers):
                for (block_id, payload, _), digest in zip(self._jobs, digests, strict=True):
                    self._blocks.memmove_layer_in(block_id, layer, payload, digest)
                self._landed_up_to(layer + 1)
            self._ok = [digest.intdigest() == stored
                        for (_, _, stored), digest in zip(self._jobs, digests, strict=True)]
        finally:
            self._landed_up_to(self._blocks.num_layers + 1)  # done, whole or not

    def _landed_up_to(self, layers: int) -> None:
        with self._ready:
            self._landed = layers
            self._ready.notify_all()

    def wait(self, layer: int) -> None:
        with self._ready:
            self._ready.wait_for(lambda: self._landed > layer)

    def result(self) -> list[bool]:
        self.wait(self._blocks.num_layers)
        return self._ok
