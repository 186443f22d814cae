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

import asyncio
from collections import deque
from enum import StrEnum
from typing import Annotated

import msgspec

from kvcake.common.codec import encode
from kvcake.common.errors import KvcakeError
from kvcake.common.log import get_logger
from kvcake.common.rpc import RpcClient
from kvcake.wire.kv import KVRegion
from kvcake.wire.output import TokenOutput


class Role(StrEnum):
    """What an instance does. A PREFILL instance computes prompts and writes their KV into a
    DECODE instance's cache; a BOTH (colocated) instance prefills and decodes its own."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"


log = get_logger(__name__)
ROLES = tuple(role.value for role in Role)
EVENT_KINDS = ("stored", "removed", "cleared")
MAX_BLOCK_HASHES = 1 << 20  # hashes in one event or snapshot: a 32 MiB cache index
Hashes = Annotated[list[bytes], msgspec.Meta(max_length=MAX_BLOCK_HASHES)]


class KVEvent(msgspec.Struct, frozen=True):
    """A change to an instance's cached blocks.

    seq: per-instance sequence number 1, 2, 3, ... with no gaps (a gap means a lost report).
    kind: ``stored`` / ``removed`` name ``block_hashes``; ``cleared`` drops everything.
    block_hashes: chained prefix digests (:mod:`kvcake.common.hashing`), 32 bytes each; at
        most ``MAX_BLOCK_HASHES``.
    """

    seq: int
    kind: str
    block_hashes: Hashes = []


class InstanceLoad(msgspec.Struct, frozen=True):
    """An instance's own view of its load, as last reported."""

    num_waiting: int  # requests queued, not started
    num_running: int  # requests in the running batch
    num_waiting_tokens: int  # prompt tokens not yet computed
    num_running_tokens: int  # total context tokens of the running batch
    num_free_blocks: int
    num_blocks: int


class PrefillSample(msgspec.Struct, frozen=True):
    """One prefill step (or chunk): ``num_new_tokens`` computed over ``num_cached_tokens``."""

    num_new_tokens: int
    num_cached_tokens: int
    seconds: float


class DecodeSample(msgspec.Struct, frozen=True):
    """One decode step of ``batch_size`` requests whose contexts sum to ``num_context_tokens``."""

    batch_size: int
    num_context_tokens: int
    seconds: float


class TransferSample(msgspec.Struct, frozen=True):
    """``num_bytes`` of KV moved between instances (or from the store) in ``seconds``."""

    num_bytes: int
    seconds: float


MAX_EVENTS = 1 << 16
MAX_SAMPLES = 1 << 16
MAX_OUTPUTS = 1 << 16


class Snapshot(msgspec.Struct, frozen=True):
    seq: int
    block_hashes: Hashes


class Register(msgspec.Struct, tag=True, frozen=True):
    instance_id: str
    role: Role
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


def next_pushed(outbox: deque[Outputs | PrefillDone]) -> Outputs | PrefillDone:
    """The next message to push from ``outbox`` (taken from it): consecutive outputs, as
    many as one message holds, become one."""
    message = outbox.popleft()
    if not isinstance(message, Outputs):
        return message
    outputs = list(message.outputs)
    while outbox and isinstance(outbox[0], Outputs) \
            and len(outputs) + len(outbox[0].outputs) <= MAX_OUTPUTS:
        outputs += outbox.popleft().outputs  # type: ignore[union-attr]
    return Outputs(message.instance_id, outputs)


class Outbox:
    """What an instance pushes to the Conductor (outputs, prefills done), in order: ``put``
    on the event loop, :meth:`send_forever` as a task; consecutive outputs (several steps'
    worth when the Conductor lags) go in one call. A message the Conductor did not take is
    logged and dropped (sent again it could deliver tokens twice)."""

    def __init__(self, conductor: RpcClient) -> None:
        self._conductor = conductor
        self._messages: deque[Outputs | PrefillDone] = deque()
        self._ready = asyncio.Event()

    def put(self, message: Outputs | PrefillDone) -> None:
        self._messages.append(message)
        self._ready.set()

    async def send_forever(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._messages:
                message = next_pushed(self._messages)
                try:
                    await self._conductor.call(encode(message))
                except KvcakeError as exc:
                    log.warning("conductor did not take %s: %s", type(message).__name__, exc)


class ReportReply(msgspec.Struct, frozen=True):
    known: bool = True  # False: register again (the conductor restarted or dropped you)
    need_snapshot: bool = False
