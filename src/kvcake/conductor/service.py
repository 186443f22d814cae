"""The Conductor: where each request prefills and decodes, and whether it may start; no I/O.

The asyncio server and the simulator both drive this class with an injected clock, so a
simulated cluster is routed by the very code that routes a real one. Per request::

    route()        price every prefill instance (queue + KV pull + prefill of the rest) and
                   every decode instance (TBT with the request added) → policy picks →
                   admission rule → Decision; an admitted request is tracked as PREFILLING
    prefill_done() PREFILLING → DECODING on its decode instance (decode start = now); the
                   prefill instance's drain fit learns how long the prefill took
    finished()     forgotten (also after a failure; unknown ids are fine)

What a prefill instance may reuse of a prompt of ``n`` tokens in blocks of ``B``::

    blocks:  [0 ........ local) [local ...... reused) [reused ........ n/B) tail
              held locally        pulled (Algorithm 1)  computed
    reused <= (n - 1) // B: at least one token is always computed (it yields the first
    output token), so a fully cached prompt still recomputes its last block.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvcake.common.errors import ErrorCode, InvalidParamsError, KvcakeError
from kvcake.conductor.admission import AdmissionInput, DecodeMember, make_admission
from kvcake.conductor.config import ConductorConfig
from kvcake.conductor.cost import CostModel, DrainFit
from kvcake.conductor.index import PrefixIndex
from kvcake.conductor.policy import DecodeEstimate, PrefillEstimate, make_policy
from kvcake.conductor.types import (
    STORE,
    ConductorStats,
    Decision,
    InstanceStats,
    PrefillTiming,
    RouteRequest,
)
from kvcake.wire.conductor import (
    ROLES,
    DecodeSample,
    InstanceLoad,
    KVEvent,
    PrefillSample,
    Role,
    TransferSample,
)

REJECT_REASONS = ("ttft_slo", "tbt_slo", "no_prefill_instance", "no_decode_instance")
PREFILL_ROLES = (Role.PREFILL, Role.BOTH)
DECODE_ROLES = (Role.DECODE, Role.BOTH)


@dataclass
class _InFlight:
    """An admitted request: PREFILLING while ``decode_start_s`` is None, then DECODING."""

    request: RouteRequest
    prefill_id: str
    decode_id: str
    prefill_s: float  # predicted; counts in the prefill instance's queue until prefill_done
    prefill_end_s: float  # predicted: route time + TTFT
    predicted_tbt_s: float = 0.0  # step time of its decode instance's batch when routed
    decode_start_s: float | None = None
    predicted_cached_tokens: int = 0  # the prefix routing counted on (local or store)
    routed_s: float = 0.0
    queue_ahead_s: float = 0.0  # predicted prefill seconds queued ahead of it when routed
    own_s: float = 0.0  # its own predicted KV pull and prefill, before the drain fit
    indexed: list[bytes] = field(default_factory=list)  # what routing added to the index


@dataclass
class _Instance:
    role: str
    num_blocks: int
    max_model_len: int = 0  # longest prompt plus output it serves (0: not said)
    load: InstanceLoad | None = None
    prefilling: dict[str, _InFlight] = field(default_factory=dict)  # prefilling here
    decode_bound: dict[str, _InFlight] = field(default_factory=dict)  # heading or decoding here
    drain: DrainFit = field(default_factory=DrainFit)

    @property
    def queue_s(self) -> float:
        """Predicted prefill seconds routed here and not yet done, before the drain fit."""
        return sum(r.prefill_s for r in self.prefilling.values())


class ConductorService:
    """State and decisions of the Conductor; see the module docstring.

    Caller faults (unknown instance or request, bad role or number) raise
    ``InvalidParamsError`` naming the culprit; registering a known instance id raises
    ``OBJECT_ALREADY_EXISTS``. A rejected route changes nothing but counters.
    """

    def __init__(self, config: ConductorConfig, clock: Callable[[], float],
                 rng: random.Random | None = None, cost: CostModel | None = None) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random(config.seed)
        self.cost = cost or CostModel()
        self.index = PrefixIndex()
        self.policy = make_policy(config.policy, self.rng)
        self.admission = make_admission(config.admission, config.slo_ttft_s, config.slo_tbt_s)
        self.instances: dict[str, _Instance] = {}
        self.requests: dict[str, _InFlight] = {}
        self.num_routed = 0
        self.rejections: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)

    # ----- instances
    def add_instance(self, instance_id: str, role: str, num_blocks: int,
                     max_model_len: int = 0) -> None:
        """Register an instance. A known id is refused (``OBJECT_ALREADY_EXISTS``): an
        instance that restarted is removed first (the server does so once the old one is
        dead), so a second registration never takes over a live instance's requests."""
        if not isinstance(instance_id, str) or not instance_id or instance_id == STORE:
            raise InvalidParamsError(f"instance_id must be a non-empty string other than "
                                     f"{STORE!r}, got {instance_id!r}")
        if role not in ROLES:
            raise InvalidParamsError(f"role of {instance_id!r} must be one of "
                                     f"{', '.join(ROLES)}; got {role!r}")
        for name, value in (("num_blocks", num_blocks), ("max_model_len", max_model_len)):
            if value < 0:
                raise InvalidParamsError(f"{name} of {instance_id!r} must be >= 0, got {value}")
        if instance_id in self.instances:
            raise KvcakeError(f"instance {instance_id!r} is already registered",
                              ErrorCode.OBJECT_ALREADY_EXISTS)
        self.instances[instance_id] = _Instance(role, num_blocks, max_model_len)
        self.index.add_instance(instance_id)

    def remove_instance(self, instance_id: str) -> list[str]:
        """Forget an instance. Returns the requests in flight on it (prefilling there, or
        bound to decode there), in routing order; they are forgotten too."""
        self._instance(instance_id)
        lost = [rid for rid, r in self.requests.items() if r.decode_id == instance_id
                or (r.prefill_id == instance_id and r.decode_start_s is None)]
        for rid in lost:
            self.finished(rid)
        del self.instances[instance_id]
        self.index.remove_instance(instance_id)
        return lost

    def report_load(self, instance_id: str, load: InstanceLoad) -> None:
        """Keep an instance's own load report (shown in :meth:`stats`)."""
        instance = self._instance(instance_id)
        for name in load.__struct_fields__:
            if getattr(load, name) < 0:
                raise InvalidParamsError(f"load of {instance_id!r}: {name} must be >= 0, "
                                         f"got {getattr(load, name)}")
        if load.num_free_blocks > load.num_blocks:
            raise InvalidParamsError(f"load of {instance_id!r}: num_free_blocks "
                                     f"{load.num_free_blocks} > num_blocks {load.num_blocks}")
        instance.load = load

    def apply_events(self, instance_id: str, events: Sequence[KVEvent]) -> bool:
        """Apply an instance's KV events; ``False`` at a sequence gap (fetch a snapshot and
        call :meth:`replace_blocks`)."""
        self._instance(instance_id)
        return self.index.apply(instance_id, events)

    def replace_blocks(self, instance_id: str, seq: int, block_hashes: Sequence[bytes]) -> None:
        """Install a snapshot of everything an instance holds, as of its event ``seq``."""
        self._instance(instance_id)
        if seq < 0:
            raise InvalidParamsError(f"snapshot of {instance_id!r}: seq must be >= 0, got {seq}")
        self.index.replace(instance_id, seq, block_hashes)

    # ----- timing samples
    def observe_prefill(self, sample: PrefillSample) -> None:
        self.cost.add_prefill(sample)

    def observe_decode(self, sample: DecodeSample) -> None:
        self.cost.add_decode(sample)

    def observe_transfer(self, sample: TransferSample) -> None:
        self.cost.add_transfer(sample)

    # ----- requests
    def route(self, request: RouteRequest) -> Decision:
        """Choose instances and admit or reject. Admitted: tracked as PREFILLING, queued on its
        prefill instance, bound to its decode instance; the index records every block of the
        prompt on the prefill instance (it will hold them; pulled ones become replicas)."""
        self._check_request(request)
        request = self._fit_output(request)
        prefill_ids = self._ids_with_role(PREFILL_ROLES)
        if not prefill_ids:
            return self._reject(request, "no_prefill_instance", "no prefill instance")
        decode_ids = self._ids_with_role(DECODE_ROLES)
        if not decode_ids:
            return self._reject(request, "no_decode_instance", "no decode instance")
        prefill = self.policy.choose_prefill(*self._price_prefill(request, prefill_ids))
        decode = self._choose_decode(request, prefill.instance_id, decode_ids)
        rejection = self.admission.check(self._admission_input(request, prefill, decode))
        if rejection is not None:
            return self._reject(request, rejection.reason, rejection.detail, prefill, decode)
        self._admit(request, prefill, decode)
        return _decision(request, None, _accepted_detail(prefill, decode), prefill, decode)

    def prefill_done(self, request_id: str, ok: bool = True) -> PrefillTiming:
        """PREFILLING → DECODING: leaves its prefill queue, decodes from now on. A prefill
        that succeeded (``ok``) teaches its instance's drain fit how long it took."""
        track = self._request(request_id)
        if track.decode_start_s is not None:
            raise InvalidParamsError(f"request {request_id!r} has finished prefill already")
        instance = self.instances[track.prefill_id]
        del instance.prefilling[request_id]
        track.decode_start_s = self.clock()
        if not ok:  # what it was to compute there never was
            self.index.retract(track.prefill_id, track.indexed)
        timing = PrefillTiming(track.prefill_end_s - track.routed_s,
                               track.queue_ahead_s + track.own_s,
                               max(0.0, track.decode_start_s - track.routed_s))
        if ok and self.config.drain_fit:
            instance.drain.add(track.queue_ahead_s, track.own_s, timing.observed_s)
        return timing

    def prefilling(self, request_id: str) -> bool:
        """Whether ``request_id`` is tracked and its prefill has not ended."""
        track = self.requests.get(request_id)
        return track is not None and track.decode_start_s is None

    def check_hit(self, request_id: str, num_cached_tokens: int) -> tuple[int, int]:
        """What the prefill instance reused against what routing counted on: ``(predicted,
        missed)`` prompt tokens, ``missed`` those of the predicted prefix it did not find
        (a stale index entry, or a store block gone). ``(0, 0)`` for an unknown request."""
        track = self.requests.get(request_id)
        if track is None:
            return 0, 0
        predicted = track.predicted_cached_tokens
        return predicted, max(0, predicted - num_cached_tokens)

    def finished(self, request_id: str, observed_tbt_s: float | None = None) -> None:
        """Forget a request (done, aborted or failed); unknown ids are ignored. A request
        that completed may say its TBT as the objective measures it: the cost model learns
        how far that lies above the step time predicted for it."""
        track = self.requests.pop(request_id, None)
        if track is None:
            return
        if observed_tbt_s is not None:
            self.cost.add_tbt(track.predicted_tbt_s, observed_tbt_s)
        if track.decode_start_s is None:  # once decoding, its prefill instance may be gone
            del self.instances[track.prefill_id].prefilling[request_id]
            self.index.retract(track.prefill_id, track.indexed)  # ended before its prefill
        del self.instances[track.decode_id].decode_bound[request_id]

    def context_len(self) -> int:
        """The longest prompt plus output every instance serves (0: none said)."""
        return min((i.max_model_len for i in self.instances.values() if i.max_model_len),
                   default=0)

    def _fit_output(self, request: RouteRequest) -> RouteRequest:
        """Admission and the decode batches count ``min(max_tokens, context - prompt)``
        output tokens: no request decodes past the context, so a huge ``max_tokens`` must
        not fill a decode instance's books (and turn every later request away)."""
        room = max(1, self.context_len() - request.num_prompt_tokens)
        if not self.context_len() or request.num_output_tokens <= room:
            return request
        return dataclasses.replace(request, num_output_tokens=room)

    # ----- pricing
    def _price_prefill(self, request: RouteRequest, prefill_ids: list[str]
                       ) -> tuple[list[PrefillEstimate], list[PrefillEstimate]]:
        """Each prefill instance priced reusing its local prefix only, and with Algorithm 1."""
        block_size = self.config.block_size
        reusable = request.block_hashes[: (request.num_prompt_tokens - 1) // block_size]
        matches = self.index.match_all(reusable)
        store_len = min(request.store_hit_blocks, len(reusable))
        local, pulled = [], []
        for instance_id in prefill_ids:
            queue_s, local_len = self.instances[instance_id].queue_s, matches[instance_id]
            local.append(self._estimate(request, instance_id, queue_s, local_len, local_len,
                                        None))
            others = matches if self.config.pull_from_instances else {}
            best_len, holder = _best_elsewhere(instance_id, others, store_len)
            if self._worth_pulling(local_len, best_len):
                pulled.append(self._estimate(request, instance_id, queue_s, local_len, best_len,
                                             holder))
            else:
                pulled.append(local[-1])
        return local, pulled

    def _worth_pulling(self, local_len: int, best_len: int) -> bool:
        """Algorithm 1: pull when the best prefix elsewhere is much longer than the local one."""
        if best_len <= local_len:
            return False
        return local_len == 0 or best_len / local_len > self.config.balancing_threshold

    def _estimate(self, request: RouteRequest, instance_id: str, queue_s: float,
                  local_len: int, reused_len: int, pull_from: str | None) -> PrefillEstimate:
        """Priced by the cost model, then by the instance's drain fit: its queue factor
        scales the queue ahead, its own factor the request's own pull and prefill."""
        block_size, cached = self.config.block_size, reused_len * self.config.block_size
        pulled_bytes = (reused_len - local_len) * block_size * self.config.kv_bytes_per_token
        transfer_s = self.cost.transfer_s(pulled_bytes) if pull_from is not None else 0.0
        prefill_s = self.cost.prefill_s(request.num_prompt_tokens - cached, cached)
        queue_k, own_k = self.instances[instance_id].drain.coefficients()
        return PrefillEstimate(instance_id, local_len, reused_len, pull_from, queue_s * queue_k,
                               transfer_s * own_k, prefill_s * own_k,
                               unscaled=(queue_s, transfer_s, prefill_s))

    def _choose_decode(self, request: RouteRequest, prefill_id: str,
                       decode_ids: list[str]) -> DecodeEstimate:
        if self.instances[prefill_id].role == Role.BOTH:  # colocated: decodes its own prefill
            return self._price_decode(request, prefill_id)
        return self.policy.choose_decode([self._price_decode(request, i) for i in decode_ids])

    def _price_decode(self, request: RouteRequest, instance_id: str) -> DecodeEstimate:
        """TBT with every request decoding or heading there, plus this one, in the batch."""
        bound = self.instances[instance_id].decode_bound.values()
        context = sum(r.request.context_tokens for r in bound) + request.context_tokens
        return DecodeEstimate(instance_id, self.cost.decode_step_s(len(bound) + 1, context))

    def _admission_input(self, request: RouteRequest, prefill: PrefillEstimate,
                         decode: DecodeEstimate) -> AdmissionInput:
        bound = self.instances[decode.instance_id].decode_bound.values()
        members = [DecodeMember(r.request.context_tokens, r.request.num_output_tokens,
                                r.prefill_end_s if r.decode_start_s is None else r.decode_start_s,
                                r.decode_start_s is not None) for r in bound]
        capacity = self.instances[decode.instance_id].num_blocks * self.config.block_size
        return AdmissionInput(self.clock(), prefill.instance_id, decode.instance_id,
                              prefill.ttft_s, request.context_tokens, members,
                              self.cost.decode_step_s, capacity, self.cost.tbt_tail)

    # ----- outcomes
    def _admit(self, request: RouteRequest, prefill: PrefillEstimate,
               decode: DecodeEstimate) -> None:
        queue_s, transfer_s, prefill_s = prefill.cost_model_s
        now = self.clock()
        track = _InFlight(request, prefill.instance_id, decode.instance_id, prefill_s,
                          now + prefill.ttft_s, decode.tbt_s,
                          predicted_cached_tokens=prefill.reused_blocks * self.config.block_size,
                          routed_s=now, queue_ahead_s=queue_s, own_s=transfer_s + prefill_s)
        self.requests[request.request_id] = track
        self.instances[prefill.instance_id].prefilling[request.request_id] = track
        self.instances[decode.instance_id].decode_bound[request.request_id] = track
        track.indexed = self.index.insert(prefill.instance_id,  # hot-block replication
                                          request.block_hashes)
        self.policy.routed(prefill.instance_id, decode.instance_id)
        self.num_routed += 1

    def _reject(self, request: RouteRequest, reason: str, detail: str,
                prefill: PrefillEstimate | None = None,
                decode: DecodeEstimate | None = None) -> Decision:
        self.rejections[reason] += 1
        return _decision(request, reason, detail, prefill, decode)

    # ----- lookups and checks
    def _instance(self, instance_id: str) -> _Instance:
        try:
            return self.instances[instance_id]
        except KeyError:
            raise InvalidParamsError(f"unknown instance {instance_id!r}") from None

    def _request(self, request_id: str) -> _InFlight:
        try:
            return self.requests[request_id]
        except KeyError:
            raise InvalidParamsError(f"unknown request {request_id!r}") from None

    def _ids_with_role(self, roles: tuple[str, ...]) -> list[str]:
        return sorted(i for i, instance in self.instances.items() if instance.role in roles)

    def _check_request(self, request: RouteRequest) -> None:
        if request.request_id in self.requests:
            raise InvalidParamsError(f"request {request.request_id!r} is already in flight")
        full_blocks = request.num_prompt_tokens // self.config.block_size
        if len(request.block_hashes) > full_blocks:
            raise InvalidParamsError(
                f"request {request.request_id!r} has {len(request.block_hashes)} block hashes, "
                f"but {request.num_prompt_tokens} tokens fill only {full_blocks} blocks of "
                f"{self.config.block_size}")

    # ----- observation
    def stats(self) -> ConductorStats:
        """A snapshot of every instance, the routed count and rejections by reason."""
        instances = {instance_id: self._instance_stats(instance_id)
                     for instance_id in sorted(self.instances)}
        return ConductorStats(instances, self.num_routed, len(self.requests),
                              dict(self.rejections), self.cost.tbt_tail)

    def _instance_stats(self, instance_id: str) -> InstanceStats:
        instance = self.instances[instance_id]
        bound = instance.decode_bound.values()
        num_decoding = sum(r.decode_start_s is not None for r in bound)
        drain = instance.drain.coefficients()
        return InstanceStats(instance.role, instance.num_blocks, instance.queue_s * drain[0],
                             len(instance.prefilling), len(bound) - num_decoding, num_decoding,
                             self.index.num_blocks(instance_id), instance.load, drain)

    def check_integrity(self) -> None:
        """Assert that the index, the instances and the tracked requests agree."""
        self.index.check_integrity()
        assert self.index.instance_ids == sorted(self.instances)
        for rid, track in self.requests.items():
            decode = self.instances[track.decode_id]
            assert decode.role in DECODE_ROLES and decode.decode_bound[rid] is track
            if track.decode_start_s is None:  # PREFILLING: its prefill instance is still there
                prefill = self.instances[track.prefill_id]
                assert prefill.role in PREFILL_ROLES and prefill.prefilling[rid] is track
                assert prefill.role != Role.BOTH or track.decode_id == track.prefill_id
        for instance in self.instances.values():
            tracked = [*instance.prefilling.items(), *instance.decode_bound.items()]
            assert all(self.requests.get(rid) is track for rid, track in tracked)
            assert all(track.decode_start_s is None for track in instance.prefilling.values())


def _best_elsewhere(instance_id: str, matches: dict[str, int], store_len: int
                    ) -> tuple[int, str]:
    """Longest prefix held anywhere but ``instance_id``, and its holder. The store wins ties
    (every prefill instance writes its blocks there, so it is the least loaded source); then
    the lowest instance id."""
    best_len, holder = store_len, STORE
    for other, length in matches.items():
        if other != instance_id and length > best_len:
            best_len, holder = length, other
    return best_len, holder


def _accepted_detail(prefill: PrefillEstimate, decode: DecodeEstimate) -> str:
    pulled = prefill.reused_blocks - prefill.local_hit_blocks
    source = f", {pulled} pulled from {prefill.pull_from!r}" if prefill.pull_from else ""
    return (f"prefill on {prefill.instance_id!r} reusing {prefill.reused_blocks} blocks "
            f"({prefill.local_hit_blocks} local{source}), TTFT {prefill.ttft_s:.3f} s; "
            f"decode on {decode.instance_id!r}, TBT {decode.tbt_s:.4f} s")


def _decision(request: RouteRequest, reason: str | None, detail: str,
              prefill: PrefillEstimate | None, decode: DecodeEstimate | None) -> Decision:
    return Decision(
        request_id=request.request_id, accepted=reason is None, reason=reason, detail=detail,
        prefill_id=prefill.instance_id if prefill else None,
        decode_id=decode.instance_id if decode else None,
        local_hit_blocks=prefill.local_hit_blocks if prefill else 0,
        reused_blocks=prefill.reused_blocks if prefill else 0,
        pull_from=prefill.pull_from if prefill else None,
        predicted_ttft_s=prefill.ttft_s if prefill else 0.0,
        predicted_tbt_s=decode.tbt_s if decode else 0.0)
