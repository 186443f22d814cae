"""Moving a request's KV blocks from a prefill instance into a decode instance's cache.

Both caches are ``(layers, 2, slots, kv_heads, head_dim)`` tensors living in registered
transfer-engine segments. A block is ``block_size`` consecutive slots, so one block of one
layer's K (or V) is one contiguous run of bytes::

    offset(layer, kv, slot) = ((layer * 2 + kv) * num_slots + slot) * slot_bytes
    slot_bytes              = kv_heads * head_dim * itemsize

A run of consecutive source blocks that lands on consecutive destination blocks therefore
moves as ``2 * layers`` contiguous writes whatever its length::

    prefill blocks  [7][8][9]    [12]            runs: (7 -> 3, 3 blocks), (12 -> 6, 1 block)
    decode blocks   [3][4][5]    [6]

Writes are submitted as soon as a block's K/V exist, so they overlap the compute that
follows. Over the network (writes run on the transfer engine's I/O thread) that is layer by
layer: the blocks a step completes go out a group of layers' K and V at a time (at least
``MIN_LAYERED_SEND_BYTES`` a send), each while the later layers compute, and when the
prefill ends only its last group is still on its way::

    layer  0   1   2   3  ...  28  29 | sample
    write          0-1     2-3 ...     28-29     (a same-host copy runs in the engine thread:
                                                  after the step, in one piece)

With a cluster token the decode instance's transfer server takes writes only inside its
grants (:mod:`kvcake.transfer.grants`). It signs one per run of consecutive reserved blocks:
``2 * layers`` ranges of the run's bytes, one layer-K/V plane apart::

    grant for blocks [3, 6)   offset = 3 * block_bytes   length = 3 * block_bytes
                              stride = num_slots * slot_bytes   count = 2 * layers

Every write of a source run lands inside the grant of the reserved run that holds it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvcake.common.errors import InvalidParamsError
from kvcake.transfer import (
    Batch,
    GrantMode,
    RemoteSegment,
    TransferEngine,
    TransferOp,
    TransferRequest,
)
from kvcake.wire.kv import KVRegion, block_spans

MIN_LAYERED_SEND_BYTES = 1 << 20  # sent layer by layer, a 2-core host lost 7 % at 48 KiB a
# send (64-token prompts) and broke even at 768 KiB (1,024 tokens): kvcake bench handoff


def kv_cache_in(buffer: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A KV cache tensor over a registered segment's memory (no copy)."""
    flat = torch.frombuffer(buffer, dtype=torch.uint8)
    return flat[:_nbytes(shape, dtype)].view(dtype).view(shape)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * dtype.itemsize


def layers_to_send(start: int, layer: int, group: int, num_layers: int) -> range | None:
    """Layers ``start .. layer`` (those written and not sent yet) once they are ``group``
    of them or ``layer`` is the last; ``None`` while fewer wait."""
    if layer + 1 - start < group and layer + 1 < num_layers:
        return None
    return range(start, layer + 1)


def block_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """``(src_start, dst_start, count)`` for each maximal run that is consecutive on both."""
    if len(src) != len(dst):
        raise InvalidParamsError(f"{len(src)} source blocks for {len(dst)} destination blocks")
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def sign_kv_grants(engine: TransferEngine, region: KVRegion, block_ids: Sequence[int],
                   ttl_s: float) -> list[bytes]:
    """WRITE grants on our own cache for ``block_ids``, one per span (none without a token)."""
    if not engine.auth.enabled:
        return []
    return [engine.sign_grant(region.descriptor.name, offset, length, GrantMode.WRITE, ttl_s,
                              stride, repeat)
            for offset, length, stride, repeat in region.grant_shapes(block_ids)]


@dataclass(frozen=True)
class KVTarget:
    """One request's destination: the decode instance's cache and the blocks reserved there,
    with the grant that covers each block (empty without a token)."""

    region: KVRegion
    segment: RemoteSegment
    block_ids: tuple[int, ...]
    grant_of: dict[int, bytes] = field(default_factory=dict)
    num_cached: int = 0  # leading blocks the peer holds already: never written


def _grants_by_block(block_ids: list[int], grants: Sequence[bytes]) -> dict[int, bytes]:
    if not grants:
        return {}
    spans = block_spans(block_ids)
    if len(spans) != len(grants):
        raise InvalidParamsError(f"{len(grants)} grants for {len(spans)} runs of blocks")
    return {first + i: grant for (first, count), grant in zip(spans, grants, strict=True)
            for i in range(count)}


def in_flight_s(batches: Sequence[Batch]) -> float:
    """Seconds during which at least one of the finished ``batches`` was in flight: the
    time their bytes took to move, without the compute between chunks of a prompt."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted((b.submitted_s, b.finished_s or b.submitted_s) for b in batches):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


@dataclass
class _Outgoing:
    target: KVTarget
    batches: list[Batch]
    num_sent_blocks: int = 0
    num_bytes: int = 0
    started_s: float = 0.0
    by_layer: bool = False  # some of its blocks went out layer by layer


class KVSender:
    """Writes blocks of local requests into peers' caches; one per prefill instance."""

    def __init__(self, engine: TransferEngine, local: KVRegion, local_bytes: memoryview) -> None:
        self.engine = engine
        self.local = local
        self._bytes = local_bytes
        self._outgoing: dict[str, _Outgoing] = {}
        self.num_sent = 0  # requests whose every write landed
        self.num_sent_by_layer = 0  # of them, those with blocks sent layer by layer
        self.num_bytes_sent = 0
        self.writing_s = 0.0  # seconds with a write of theirs in flight, summed over requests

    def target(self, region: KVRegion, block_ids: list[int],
               grants: Sequence[bytes] = (), num_cached: int = 0) -> KVTarget:
        """Reach a peer's cache; refuses one of another model, dtype or layout. The first
        ``num_cached`` of ``block_ids`` hold the prompt's KV already and are skipped;
        ``grants``: the peer's, one per span of the rest (see :func:`sign_kv_grants`)."""
        if not 0 <= num_cached < max(len(block_ids), 1):
            raise InvalidParamsError(f"{num_cached} cached blocks of {len(block_ids)} "
                                     f"reserved: at least the last one must be written")
        if region.fingerprint != self.local.fingerprint or region.slot_bytes != \
                self.local.slot_bytes or region.block_size != self.local.block_size:
            raise InvalidParamsError(
                f"KV cache {region.descriptor.name!r} has fingerprint {region.fingerprint} / "
                f"block {region.block_size}; this instance has {self.local.fingerprint} / "
                f"block {self.local.block_size}")
        return KVTarget(region, self.engine.attach(region.descriptor), tuple(block_ids),
                        _grants_by_block(block_ids[num_cached:], grants), num_cached)

    def open(self, request_id: str, target: KVTarget) -> None:
        """Start writing into ``target`` from its first block not cached there."""
        self._outgoing[request_id] = _Outgoing(target, [], target.num_cached,
                                               started_s=time.monotonic())

    def is_sending(self, request_id: str) -> bool:
        return request_id in self._outgoing

    def num_sent_blocks(self, request_id: str) -> int:
        return self._outgoing[request_id].num_sent_blocks

    def layer_group(self, request_id: str, num_blocks: int) -> int:
        """How many layers of the request's next ``num_blocks`` blocks to send at a time
        while the step computes: enough that each send moves ``MIN_LAYERED_SEND_BYTES``.
        Every layer (one send after the step) where that is the whole step's worth, or
        where the writes are same-host copies: those run in the calling thread and overlap
        nothing. Over the network they run on the transfer engine's I/O thread."""
        num_layers = self.local.num_layers
        if self._outgoing[request_id].target.segment.transport == "shm":
            return num_layers
        per_layer = sum(length for _, length in self.local.block_ranges(0, num_blocks,
                                                                        range(1)))
        return min(num_layers, -(-MIN_LAYERED_SEND_BYTES // max(per_layer, 1)))

    def send_layers(self, request_id: str, block_ids: list[int], sent: int, layer: int,
                    group: int) -> int:
        """Layer ``layer`` of the step's ``block_ids`` is written: send the group of layers
        it ends, if any (:func:`layers_to_send`; none where ``group`` is every layer, which
        goes after the step). How many leading layers are on their way now (``sent`` so
        far)."""
        num_layers = self.local.num_layers
        layers = layers_to_send(sent, layer, group, num_layers)
        if group >= num_layers or layers is None:
            return sent
        self.send(request_id, block_ids, layers)
        return layers.stop

    def send(self, request_id: str, block_ids: list[int], layers: range | None = None
             ) -> None:
        """Write the request's next ``len(block_ids)`` blocks (its local ids, in order):
        every layer, after which they count as sent; or only ``layers``, and once every
        layer is on its way, :meth:`advance` past them."""
        out = self._outgoing[request_id]
        first = out.num_sent_blocks
        dst = list(out.target.block_ids[first:first + len(block_ids)])
        if len(dst) < len(block_ids):
            raise InvalidParamsError(f"request {request_id!r}: {first + len(block_ids)} "
                                     f"blocks for {len(out.target.block_ids)} reserved")
        requests = self._requests(out.target, block_runs(block_ids, dst), layers)
        out.batches.append(self.engine.submit(requests))
        out.num_bytes += sum(r.length for r in requests)
        if layers is None:
            self.advance(request_id, len(block_ids))
        else:
            out.by_layer = True

    def advance(self, request_id: str, num_blocks: int) -> None:
        """The request's next ``num_blocks`` blocks were sent, each layer of them."""
        self._outgoing[request_id].num_sent_blocks += num_blocks

    def _requests(self, target: KVTarget, runs: list[tuple[int, int, int]],
                  layers: range | None) -> list[TransferRequest]:
        requests = []
        for src, dst, count in runs:
            grant = target.grant_of.get(dst, b"")
            pairs = zip(self.local.block_ranges(src, count, layers),
                        target.region.block_ranges(dst, count, layers), strict=True)
            requests += [TransferRequest(TransferOp.WRITE, target.segment, remote,
                                         self._bytes[local:local + length], grant)
                         for (local, length), (remote, _) in pairs]
        return requests

    def wait(self, request_id: str, timeout_s: float) -> tuple[int, float]:
        """Wait for every write of the request; returns (bytes, seconds since it opened).

        Raises ``TransferError`` if a write failed (the peer died, or timed out)."""
        out = self._outgoing.pop(request_id)
        for batch in out.batches:
            batch.wait(timeout_s)
        self.num_sent += 1
        self.num_sent_by_layer += out.by_layer
        self.num_bytes_sent += out.num_bytes
        self.writing_s += in_flight_s(out.batches)
        return out.num_bytes, time.monotonic() - out.started_s

    def drain(self, request_id: str) -> None:
        """Let in-flight writes finish (their source blocks are about to be reused); errors
        are ignored here and surface in :meth:`wait`."""
        out = self._outgoing.get(request_id)
        if out is None:
            return
        for batch in out.batches:
            try:
                batch.wait(30.0)
            except Exception:  # reported by wait()
                return

    def cancel(self, request_id: str) -> None:
        self.drain(request_id)
        self._outgoing.pop(request_id, None)
