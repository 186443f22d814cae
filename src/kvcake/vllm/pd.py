"""Prefill/decode disaggregation in kvcake's vLLM connector, scheduler side, without vLLM:
which requests wait for a prefill's writes, and which blocks a prefill writes after each
step. No I/O, no torch.

A request takes part when vLLM's ``kv_transfer_params`` carry a ``kvcake`` entry
(:func:`pd_params`)::

    decode  {"role": "decode", "key": K}       wait for the prompt's KV (vLLM allocates the
                                               blocks; the sidecar reads them from the
                                               control channel and the Conductor hands them
                                               to a prefill instance)
    prefill {"role": "prefill", "key": K,      write the prompt's blocks into the decode
             "target": region, "block_ids": [...], "grants": [...]}   instance's, as they fill

The decode instance reserves the prompt's blocks past its own cached prefix; the prefill
writes its blocks at the same positions of the prompt::

    prompt blocks        0    1    2    3    4 (partial: the prompt's last tokens)
    decode cache hit   [==========]
    decode's blocks              [ 17][ 18][ 19]     Blocks(block_ids=[17, 18, 19])
    prefill's blocks   [  3][  4][  5][  6][  7]     writes 5->17, 6->18, 7->19

A block is written once every token of it is computed (or loaded), the partial last one
once the prompt is; vLLM's decode recomputes the prompt's last token and samples from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvcake.common.errors import InvalidParamsError
from kvcake.wire.kv import KVRegion
from kvcake.wire.vllm import PD_PARAMS


class PrefillTarget(msgspec.Struct, frozen=True):
    """Where a prefill request's blocks go: the decode instance's cache and blocks."""

    key: str
    target: KVRegion
    block_ids: list[int]
    grants: list[bytes] = []


class DecodeWait(msgspec.Struct, frozen=True):
    key: str


def pd_params(kv_transfer_params: Mapping[str, Any] | None) -> PrefillTarget | DecodeWait | None:
    """The request's part in P/D (``None``: none); bad parameters are refused by name."""
    entry = (kv_transfer_params or {}).get(PD_PARAMS)
    if entry is None:
        return None
    role = entry.get("role") if isinstance(entry, dict) else None
    if role not in ("prefill", "decode"):
        raise InvalidParamsError(f"kv_transfer_params.{PD_PARAMS}.role must be 'prefill' or "
                                 f"'decode', got {role!r}")
    body = {k: v for k, v in entry.items() if k != "role"}
    try:
        if role == "prefill":
            return msgspec.convert(body, PrefillTarget)
        return msgspec.convert(body, DecodeWait)
    except msgspec.ValidationError as exc:
        raise InvalidParamsError(f"kv_transfer_params.{PD_PARAMS}: {exc}") from None


def prefill_params(target: PrefillTarget) -> dict[str, Any]:
    """The ``kv_transfer_params`` that make a vLLM instance prefill for ``target``."""
    return {PD_PARAMS: {"role": "prefill", **msgspec.to_builtins(target)}}


def decode_params(key: str) -> dict[str, Any]:
    return {PD_PARAMS: {"role": "decode", "key": key}}


def prompt_blocks(num_prompt_tokens: int, block_size: int) -> int:
    return -(-num_prompt_tokens // block_size)


@dataclass(frozen=True)
class Send:
    """Blocks a prefill request writes after this step: its own ``src`` to the decode
    instance's ``dst``; ``last``: the request's final write (then the decode is told)."""

    request_id: str
    key: str
    target: KVRegion
    grants: tuple[bytes, ...]
    all_dst: tuple[int, ...]  # every block reserved for the request (the grants' spans)
    src: tuple[int, ...]
    dst: tuple[int, ...]
    last: bool


@dataclass(frozen=True)
class Arrival:
    """A decode request whose KV came (``ok``) or will not (its ``block_ids`` then count as
    load errors, and vLLM computes them)."""

    request_id: str
    ok: bool
    block_ids: tuple[int, ...]
    ended: bool = False  # vLLM ended the request while it waited: only its blocks go


@dataclass
class _Sending:
    target: PrefillTarget
    num_prompt_tokens: int
    next_block: int  # the first prompt block not written yet


@dataclass
class _Waiting:
    request_id: str
    block_ids: tuple[int, ...] | None = None  # written by the prefill, once allocated
    arrived: bool | None = None  # the prefill's word, if it came first


@dataclass
class PdPlan:
    """The scheduler side's P/D bookkeeping (one per vLLM instance)."""

    block_size: int
    _sending: dict[str, _Sending] = field(default_factory=dict)
    _waiting: dict[str, _Waiting] = field(default_factory=dict)  # by key
    _key_of: dict[str, str] = field(default_factory=dict)  # request id -> key
    _arrivals: list[Arrival] = field(default_factory=list)
    _abandoned: dict[str, tuple[_Waiting, float]] = field(default_factory=dict)
    _handed: set[str] = field(default_factory=set)  # decode requests whose blocks went out
    _forgotten: set[str] = field(default_factory=set)  # forgotten before vLLM gave blocks

    # -- prefill ---------------------------------------------------------------------

    def prefill(self, request_id: str, target: PrefillTarget, num_prompt_tokens: int) -> None:
        """Write the prompt's blocks for ``target`` as they fill. A request vLLM preempted
        and admits again keeps its place: the blocks written are in the target already."""
        if request_id in self._sending:
            return
        total = prompt_blocks(num_prompt_tokens, self.block_size)
        if len(target.block_ids) > total:
            raise InvalidParamsError(f"request {target.key}: {len(target.block_ids)} target "
                                     f"blocks for a prompt of {total}")
        self._sending[request_id] = _Sending(target, num_prompt_tokens,
                                             total - len(target.block_ids))

    def sends(self, request_id: str, num_done_tokens: int,
              block_ids: Sequence[int]) -> Send | None:
        """What the prefill request writes once ``num_done_tokens`` of it are computed."""
        sending = self._sending.get(request_id)
        if sending is None:
            return None
        n = sending.num_prompt_tokens
        total = prompt_blocks(n, self.block_size)
        ready = total if num_done_tokens >= n else num_done_tokens // self.block_size
        first, stop = sending.next_block, min(ready, len(block_ids))
        if stop <= first and ready < total:
            return None
        sending.next_block = max(stop, first)
        offset = total - len(sending.target.block_ids)
        target = sending.target
        last = ready >= total
        if last:
            del self._sending[request_id]
        return Send(request_id, target.key, target.target, tuple(target.grants),
                    tuple(target.block_ids), tuple(block_ids[first:stop]),
                    tuple(target.block_ids[first - offset:stop - offset]), last)

    # -- decode ----------------------------------------------------------------------

    def wait(self, request_id: str, key: str, now: float = 0.0, grace_s: float = 0.0) -> None:
        """``request_id`` waits for the prefill under ``key``. Another request still waiting
        under it (a reservation asked again before the first one's Forget came) is
        forgotten: the prefill writes the newer one's blocks."""
        earlier = self._waiting.get(key)
        if earlier is not None and earlier.request_id != request_id:
            self.forget(key, now, grace_s)
        self._waiting.setdefault(key, _Waiting(request_id))
        self._key_of[request_id] = key

    def allocated(self, request_id: str, block_ids: Sequence[int],
                  num_computed_tokens: int) -> tuple[str, tuple[int, ...]] | None:
        """vLLM gave the waiting request its blocks: ``(key, the blocks to write)``. A request
        forgotten meanwhile gets its word at once (a failed load: no prefill writes them), or
        vLLM would hold its blocks for an arrival that never comes."""
        if request_id in self._forgotten:
            self._forgotten.discard(request_id)
            self._handed.add(request_id)
            key = self._key_of.pop(request_id, None)  # asked again after the Forget
            waiting = self._waiting.get(key) if key is not None else None
            if key is not None and waiting is not None and waiting.request_id == request_id:
                del self._waiting[key]
            done = tuple(block_ids[num_computed_tokens // self.block_size:])
            self._arrivals.append(Arrival(request_id, False, done))
            return None
        key = self._key_of.get(request_id)
        if key is None:
            return None
        waiting = self._waiting[key]
        waiting.block_ids = tuple(block_ids[num_computed_tokens // self.block_size:])
        self._handed.add(request_id)
        if waiting.arrived is not None:
            self._arrive(key, waiting.arrived)
        return key, waiting.block_ids

    def blocks_of(self, key: str) -> tuple[int, ...] | None:
        waiting = self._waiting.get(key)
        return None if waiting is None else waiting.block_ids

    def arrived(self, key: str, ok: bool) -> bool:
        """The prefill's word on ``key``; False when no request waits under it. A request
        abandoned under the same key (a reservation asked again after one that timed out)
        lets its blocks go: the prefill wrote the waiting one's."""
        abandoned = self._abandoned.pop(key, None)
        if abandoned is not None:  # its blocks may go now
            self._arrivals.append(Arrival(abandoned[0].request_id, False,
                                          abandoned[0].block_ids or (), ended=True))
        waiting = self._waiting.get(key)
        if waiting is None:
            return False
        if waiting.block_ids is None:
            waiting.arrived = ok  # early (an empty write): kept until vLLM allocates
            return True
        self._arrive(key, ok)
        return True

    def _arrive(self, key: str, ok: bool) -> None:
        waiting = self._waiting.pop(key)
        self._key_of.pop(waiting.request_id, None)
        self._arrivals.append(Arrival(waiting.request_id, ok, waiting.block_ids or ()))

    def take_arrivals(self, now: float = float("-inf")) -> list[Arrival]:
        """Arrivals since the last call, and abandoned requests whose grace ended by ``now``
        (vLLM frees an aborted request's blocks only once they are said to have come)."""
        for key, (waiting, deadline) in list(self._abandoned.items()):
            if deadline <= now:
                del self._abandoned[key]
                self._arrivals.append(Arrival(waiting.request_id, False,
                                              waiting.block_ids or (), ended=True))
        arrivals, self._arrivals = self._arrivals, []
        return arrivals

    def forget(self, key: str, now: float = 0.0, grace_s: float = 0.0) -> None:
        """The request under ``key`` ended before its prefill's word."""
        waiting = self._waiting.pop(key, None)
        if waiting is None:
            return
        self._key_of.pop(waiting.request_id, None)
        if waiting.block_ids is not None:  # vLLM holds its blocks for the prefill's writes
            self._abandoned[key] = (waiting, now + grace_s)
        else:  # vLLM is about to give it blocks (or to end it)
            self._forgotten.add(waiting.request_id)

    def finished(self, request_id: str, now: float = 0.0, grace_s: float = 0.0) -> None:
        """vLLM ended the request (finished, or aborted while it waited: then its blocks
        stay held until the prefill's word comes or ``grace_s`` has passed)."""
        self._sending.pop(request_id, None)
        self._handed.discard(request_id)
        key = self._key_of.get(request_id)
        if key is not None:
            self.forget(key, now, grace_s)
        self._forgotten.discard(request_id)  # ended: vLLM gives it no blocks

    def waits(self, request_id: str) -> bool:
        """Whether vLLM's blocks for the request go to :meth:`allocated`."""
        return request_id in self._key_of or request_id in self._forgotten

    def waited(self, request_id: str) -> bool:
        """Whether the decode request's blocks went to its prefill once already. vLLM
        admits such a request again only when that load failed or the request was
        preempted; no prefill writes for it any more, so it computes its prompt itself."""
        return request_id in self._handed

    def num_waiting(self) -> int:
        """Decode requests (running or abandoned) still waiting for their prefill's word."""
        return len(self._waiting) + len(self._abandoned)
