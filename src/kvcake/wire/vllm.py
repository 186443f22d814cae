"""The control channel of a vLLM instance's kvcake connector (its scheduler side), for
prefill/decode disaggregation. Its callers are the instance's sidecar (``kvcake
vllm-instance``) and the workers of prefill instances::

    sidecar of D          D's connector (scheduler)         P's connector (worker)
        |-- Describe ---------->|  the KV cache as a region
        |   (the request goes to D over HTTP; vLLM allocates its blocks)
        |-- AwaitBlocks(key) -->|  waits for the allocation
        |<-- Blocks(ids, grants)|
        |                       |<==== KV writes into the blocks ======|
        |                       |<-- KvArrived(key, ok) ----------------|  after its last write
        |                 D's request joins its batch (or recomputes, when not ok)

``key`` is the Conductor's request id, carried to both instances in vLLM's
``kv_transfer_params`` (vLLM names requests its own way). Replies are ``Ack`` unless named.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from kvcake.wire.kv import KVRegion
from kvcake.wire.worker import BlockIds, Grants

MAX_KEY = 256
Key = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY)]
PD_PARAMS = "kvcake"  # the entry of vLLM's kv_transfer_params that kvcake's connector reads


class Describe(msgspec.Struct, tag=True, frozen=True):
    """What the instance is, once its KV cache exists."""


class AwaitBlocks(msgspec.Struct, tag=True, frozen=True):
    """The blocks vLLM allocated for the decode request ``key``, once it has; ``Blocks``
    with ``block_ids=None`` if it has not within ``timeout_s`` (no room now)."""

    key: Key
    timeout_s: Annotated[float, msgspec.Meta(ge=0.0, le=600.0)]
    grant_ttl_s: Annotated[float, msgspec.Meta(ge=0.0, le=3600.0)] = 60.0


class KvArrived(msgspec.Struct, tag=True, frozen=True):
    """The prefill finished writing ``key``'s blocks (``ok``), or gave up on them: the decode
    request then computes its prompt itself."""

    key: Key
    ok: bool


class Forget(msgspec.Struct, tag=True, frozen=True):
    """Drop what is known of ``key`` (its request was aborted before it was allocated)."""

    key: Key


ControlRequest = Describe | AwaitBlocks | KvArrived | Forget


class Described(msgspec.Struct, frozen=True):
    region: KVRegion | None  # None: the KV cache is not in a segment (no P/D)
    fingerprint: str
    block_size: int
    num_blocks: int
    counts: dict[str, int] = {}  # P/D so far: received (requests, blocks), failed


class Blocks(msgspec.Struct, frozen=True):
    """The blocks a prefill writes, in prompt order: they hold the prompt's last
    ``len(block_ids)`` blocks (the decode instance caches the ones before)."""

    block_ids: BlockIds | None
    grants: Grants = []
