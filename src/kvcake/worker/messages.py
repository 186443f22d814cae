"""The worker's RPC channel: what the Conductor asks a prefill, decode or colocated instance.

::

    conductor                      prefill P                       decode D
        |-- Reserve(n tokens) ----------------------------------------->|  blocks held
        |<------------------------------------------ Reserved(blocks) --|
        |-- Prefill(prompt, target=D's cache + blocks) -->|
        |                                |== KV writes, chunk by chunk ==>|
        |<-- PrefillDone(first token) ---|
        |-- Commit(prompt, first token) -------------------------------->|  joins its batch
        |<================================== Outputs (every step) ======|

A colocated (``both``) instance gets ``Prefill`` with no target and streams ``Outputs``
itself. Replies are ``Ack`` unless named. With a cluster token the decode instance signs a
WRITE grant for each run of consecutive blocks it reserved (every layer's K and V of them);
the Conductor passes them on in ``Prefill`` and the prefill presents them with its writes.
"""

from __future__ import annotations

import msgspec

from kvcake.engine.kv_transfer import KVRegion
from kvcake.engine.sampling import SamplingParams


class Prefill(msgspec.Struct, tag=True, frozen=True):
    """Compute the prompt (reusing cached KV); with a ``target``, write its K/V there, stop
    after the first token and report ``PrefillDone``; without, generate and stream."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: str
    target: KVRegion | None = None
    target_block_ids: list[int] = []
    target_grants: list[bytes] = []  # the decode instance's, one per run of its blocks


class Reserve(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    num_prompt_tokens: int


class Commit(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    prompt_token_ids: list[int]
    first_token: int
    first_logprob: float
    params: SamplingParams
    tenant: str
    first_top_logprobs: list[tuple[int, float]] = []


class Release(msgspec.Struct, tag=True, frozen=True):
    request_id: str


class Abort(msgspec.Struct, tag=True, frozen=True):
    request_id: str


WorkerRequest = Prefill | Reserve | Commit | Release | Abort


class Reserved(msgspec.Struct, frozen=True):
    block_ids: list[int] | None  # None: no room now
    grants: list[bytes] = []  # with a cluster token: WRITE grants, one per run of blocks


class Ack(msgspec.Struct, frozen=True):
    ok: bool = True
