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

Every list has a maximum, checked while the call is decoded (before the instance looks at
one element); a longer one gets ``INVALID_PARAMS`` and the instance serves on: prompts
``MAX_PROMPT_TOKENS``, block ids and grants ``MAX_BLOCK_IDS``, a token's top alternatives
``MAX_TOP_LOGPROBS``; ``SamplingParams`` bounds its stop lists itself.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from kvcake.wire.kv import KVRegion
from kvcake.wire.output import TopLogprobs
from kvcake.wire.sampling import SamplingParams

MAX_PROMPT_TOKENS = 1 << 20
MAX_BLOCK_IDS = 1 << 20
Tokens = Annotated[list[int], msgspec.Meta(max_length=MAX_PROMPT_TOKENS)]
BlockIds = Annotated[list[int], msgspec.Meta(max_length=MAX_BLOCK_IDS)]
Grants = Annotated[list[bytes], msgspec.Meta(max_length=MAX_BLOCK_IDS)]


class Prefill(msgspec.Struct, tag=True, frozen=True):
    """Compute the prompt (reusing cached KV); with a ``target``, write its K/V there, stop
    after the first token and report ``PrefillDone``; without, generate and stream."""

    request_id: str
    prompt_token_ids: Tokens
    params: SamplingParams
    tenant: str
    target: KVRegion | None = None
    target_block_ids: BlockIds = []
    target_grants: Grants = []  # the decode instance's, one per run of its blocks to write
    # leading target blocks the decode instance holds already (not written)
    target_cached_blocks: Annotated[int, msgspec.Meta(ge=0)] = 0


MAX_HOLD_S = 600.0  # a reservation outlives a silent Conductor by no more than this


class Reserve(msgspec.Struct, tag=True, frozen=True):
    """Blocks for a prompt's KV, held until committed or released, or for :func:`seat_s`
    (``hold_s`` is the prefill's predicted time, with slack; at most ``MAX_HOLD_S``) if
    neither comes: a long prefill queue must not outlive its seat.

    The prompt, its parameters and tenant come along for engines that admit a request whole
    (vLLM allocates blocks only for a request it has); kvcake's engine looks up the prompt's
    leading blocks in its own cache, so only the rest cross from the prefill instance.
    """

    request_id: str
    num_prompt_tokens: int
    hold_s: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_HOLD_S)] = 0.0
    prompt_token_ids: Tokens = []
    params: SamplingParams | None = None
    tenant: str = ""


def seat_s(reserve_timeout_s: float, hold_s: float, transfer_timeout_s: float) -> float:
    """How long an uncommitted seat is held, and its write grants last: ``reserve_timeout_s
    + hold_s`` for the commit, then ``transfer_timeout_s`` for the writes of a prefill that
    committed at the last moment, so its blocks never go to another request while a write may
    land."""
    return reserve_timeout_s + hold_s + transfer_timeout_s


class Commit(msgspec.Struct, tag=True, frozen=True):
    """The prefill wrote the KV: join the batch. ``first_token`` -1: the prefill did not
    sample one (vLLM's decode samples it from the prompt's last position itself)."""

    request_id: str
    prompt_token_ids: Tokens
    first_token: int
    first_logprob: float
    params: SamplingParams
    tenant: str
    first_top_logprobs: TopLogprobs = []


class Release(msgspec.Struct, tag=True, frozen=True):
    request_id: str


class Abort(msgspec.Struct, tag=True, frozen=True):
    request_id: str


WorkerRequest = Prefill | Reserve | Commit | Release | Abort


class Reserved(msgspec.Struct, frozen=True):
    block_ids: BlockIds | None  # None: no room now
    grants: Grants = []  # with a cluster token: WRITE grants, one per run of blocks to write
    # leading blocks that hold the prompt's KV already (the prefill does not write them)
    num_cached_blocks: Annotated[int, msgspec.Meta(ge=0)] = 0


class Ack(msgspec.Struct, frozen=True):
    ok: bool = True
