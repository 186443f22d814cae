"""The Conductor's RPC channel: what instances tell it.

An instance registers once (and again whenever the Conductor answers that it does not know
it: the Conductor restarted), then reports its load and KV events every ``report_s``.
Events carry sequence numbers; on a gap the Conductor asks for a snapshot, which the next
report carries. Token outputs and prefill completions are pushed as they happen.

Every list has a maximum, checked while the call is decoded (before the Conductor looks at
one element); a longer one gets ``INVALID_PARAMS`` and the Conductor serves on:

=========================================  ===============================================
list                                       maximum
=========================================  ===============================================
``Snapshot.block_hashes``,                 ``MAX_BLOCK_HASHES`` (an instance's whole cache)
``KVEvent.block_hashes``
``Report.events``                          ``MAX_EVENTS``
``*_samples``                              ``MAX_SAMPLES`` (a worker keeps the newest)
``Outputs.outputs``                        ``MAX_OUTPUTS`` (a worker sends more in turn)
``TokenOutput`` token ids, log-probs,      ``MAX_TOKENS`` (a context's worth)
prompt log-probs and their top lists
each top list (alternatives of a token)    ``MAX_TOP_LOGPROBS``
=========================================  ===============================================
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from kvcake.conductor.types import (
    MAX_BLOCK_HASHES,
    DecodeSample,
    InstanceLoad,
    KVEvent,
    PrefillSample,
    TransferSample,
)
from kvcake.engine.kv_transfer import KVRegion

MAX_EVENTS = 1 << 16
MAX_SAMPLES = 1 << 16
MAX_OUTPUTS = 1 << 16
MAX_TOKENS = 1 << 20
MAX_TOP_LOGPROBS = 64
Hashes = Annotated[list[bytes], msgspec.Meta(max_length=MAX_BLOCK_HASHES)]
Top = Annotated[list[tuple[int, float]], msgspec.Meta(max_length=MAX_TOP_LOGPROBS)]
TopPerToken = Annotated[list[Top], msgspec.Meta(max_length=MAX_TOKENS)]
Floats = Annotated[list[float], msgspec.Meta(max_length=MAX_TOKENS)]


class Snapshot(msgspec.Struct, frozen=True):
    seq: int
    block_hashes: Hashes


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
    prefill_samples: Annotated[list[PrefillSample], msgspec.Meta(max_length=MAX_SAMPLES)] = []
    decode_samples: Annotated[list[DecodeSample], msgspec.Meta(max_length=MAX_SAMPLES)] = []


class Report(msgspec.Struct, tag=True, frozen=True):
    instance_id: str
    load: InstanceLoad
    events: Annotated[list[KVEvent], msgspec.Meta(max_length=MAX_EVENTS)] = []
    snapshot: Snapshot | None = None
    prefill_samples: Annotated[list[PrefillSample], msgspec.Meta(max_length=MAX_SAMPLES)] = []
    decode_samples: Annotated[list[DecodeSample], msgspec.Meta(max_length=MAX_SAMPLES)] = []
    transfer_samples: Annotated[list[TransferSample],
                                msgspec.Meta(max_length=MAX_SAMPLES)] = []


class TokenOutput(msgspec.Struct, frozen=True, array_like=True):
    """New tokens of one request; ``top_logprobs`` (one list per token) and the prompt's
    scores only when the request asked for them (see ``RequestOutput``)."""

    request_id: str
    token_ids: Annotated[list[int], msgspec.Meta(max_length=MAX_TOKENS)]
    logprobs: Floats
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_store_tokens: int
    top_logprobs: TopPerToken = []
    prompt_logprobs: Floats | None = None
    prompt_top_logprobs: TopPerToken | None = None


class Outputs(msgspec.Struct, tag=True, frozen=True):
    instance_id: str
    outputs: Annotated[list[TokenOutput], msgspec.Meta(max_length=MAX_OUTPUTS)]


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
