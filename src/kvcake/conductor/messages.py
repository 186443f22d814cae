"""The Conductor's RPC channel: what instances tell it.

An instance registers once (and again whenever the Conductor answers that it does not know
it: the Conductor restarted), then reports its load and KV events every ``report_s``.
Events carry sequence numbers; on a gap the Conductor asks for a snapshot, which the next
report carries. Token outputs and prefill completions are pushed as they happen.
"""

from __future__ import annotations

import msgspec

from kvcake.conductor.types import (
    DecodeSample,
    InstanceLoad,
    KVEvent,
    PrefillSample,
    TransferSample,
)
from kvcake.engine.kv_transfer import KVRegion


class Snapshot(msgspec.Struct, frozen=True):
    seq: int
    block_hashes: list[bytes]


class Register(msgspec.Struct, tag=True, frozen=True):
    instance_id: str
    role: str
    endpoint: str  # the instance's RPC server
    model_name: str
    fingerprint: str
    block_size: int
    num_blocks: int
    max_model_len: int
    kv_region: KVRegion | None
    snapshot: Snapshot
    prefill_samples: list[PrefillSample] = []
    decode_samples: list[DecodeSample] = []


class Report(msgspec.Struct, tag=True, frozen=True):
    instance_id: str
    load: InstanceLoad
    events: list[KVEvent] = []
    snapshot: Snapshot | None = None
    prefill_samples: list[PrefillSample] = []
    decode_samples: list[DecodeSample] = []
    transfer_samples: list[TransferSample] = []


class TokenOutput(msgspec.Struct, frozen=True, array_like=True):
    """New tokens of one request; ``top_logprobs`` (one list per token) and the prompt's
    scores only when the request asked for them (see ``RequestOutput``)."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_store_tokens: int
    top_logprobs: list[list[tuple[int, float]]] = []
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


class Outputs(msgspec.Struct, tag=True, frozen=True):
    instance_id: str
    outputs: list[TokenOutput]


class PrefillDone(msgspec.Struct, tag=True, frozen=True):
    """A prefill with a target finished: its K/V are in the decode instance's blocks
    (unless ``error``). ``output`` holds the first token."""

    instance_id: str
    output: TokenOutput
    error: str = ""


ConductorRequest = Register | Report | Outputs | PrefillDone


class ReportReply(msgspec.Struct, frozen=True):
    known: bool = True  # False: register again (the conductor restarted or dropped you)
    need_snapshot: bool = False
