"""The cluster simulator: trace requests, the live Conductor's code, simulated instances.

Per request (all in simulated time, driven by :class:`~kvcake.sim.events.EventQueue`)::

    ARRIVAL     the pool tier is asked for the prompt's leading blocks; the Conductor
                (``ConductorService``, the class the live server runs) routes or rejects
    prefill     on the chosen instance, in steps (``SimInstance``); when its first chunk
                runs, the prompt reuses its local prefix, or more: what the Conductor said
                to pull from another instance, or what the pool tier holds
    first token blocks enter the instance's cache (KV events to the Conductor's index) and
                the pool tier; the KV goes to the decode instance (its last chunk's share is
                on the wire after compute; earlier chunks overlapped)
    KV_ARRIVED  optionally rejected when the decode batch would break the TBT SLO (the
                paper's baseline); else it waits for a seat and decodes, one token a step
    last token  the Conductor forgets it

Instances are ``prefill-00..``, ``decode-00..`` and ``colocated-00..``; every choice is
deterministic given the seed (the ``random`` policy's generator).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvcake.common.errors import InvalidParamsError
from kvcake.common.hashing import DIGEST_SIZE
from kvcake.conductor.config import ConductorConfig
from kvcake.conductor.service import ConductorService
from kvcake.conductor.types import STORE, RouteRequest
from kvcake.sim.cache import PoolCache
from kvcake.sim.events import EventKind, EventQueue
from kvcake.sim.instance import SimInstance
from kvcake.sim.profile import Profile
from kvcake.sim.request import Phase, SimRequest
from kvcake.wire.conductor import KVEvent, Role


@dataclass(frozen=True)
class SimConfig:
    """A cluster to simulate.

    num_prefill / num_decode / num_colocated: instances of each role (a cluster needs a
        prefill and a decode side: prefill + decode >= 1 each, or colocated >= 1).
    policy, admission, balancing_threshold, slo_*: the Conductor's (``ConductorConfig``).
    pool_capacity_blocks: a shared store tier of this many blocks (0: unbounded); ``None``
        for none, in which case prefixes move only between instance caches.
    pull_from_instances: Algorithm 1 may pull a prefix from another instance's cache.
    drain_fit: the Conductor learns how each prefill instance drains its queue, as the
        live one does (``ConductorConfig.drain_fit``).
    eviction: order for every cache (the store's registry: ``lru``, ``fifo``).
    reject_at_decode: a request whose KV reaches a decode instance that cannot meet the TBT
        SLO with it is rejected there (its prefill wasted), as the paper's baseline does.
    keep_gaps: keep every request's token gaps (for plots and tests; memory grows).
    """

    profile: Profile
    num_prefill: int = 8
    num_decode: int = 8
    num_colocated: int = 0
    policy: str = "kvcache_centric"
    admission: str = "none"
    balancing_threshold: float = 2.0
    slo_ttft_s: float = 30.0
    slo_tbt_s: float = 0.1
    pool_capacity_blocks: int | None = None
    pull_from_instances: bool = True
    drain_fit: bool = True
    eviction: str = "lru"
    reject_at_decode: bool = False
    seed: int = 0
    keep_gaps: bool = False
    conductor: ConductorConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        counts = (self.num_prefill, self.num_decode, self.num_colocated)
        if min(counts) < 0:
            raise InvalidParamsError(f"instance counts must be >= 0, got prefill "
                                     f"{self.num_prefill}, decode {self.num_decode}, "
                                     f"colocated {self.num_colocated}")
        split = self.num_prefill >= 1 and self.num_decode >= 1
        if not (split or (self.num_colocated >= 1 and self.num_prefill == self.num_decode == 0)):
            raise InvalidParamsError("a cluster needs prefill >= 1 and decode >= 1, or "
                                     "colocated >= 1 alone")
        if self.pool_capacity_blocks is not None and self.pool_capacity_blocks < 0:
            raise InvalidParamsError(f"pool capacity must be >= 0 blocks, got "
                                     f"{self.pool_capacity_blocks}")
        object.__setattr__(self, "conductor", ConductorConfig(
            policy=self.policy, admission=self.admission, block_size=self.profile.block_tokens,
            kv_bytes_per_token=self.profile.kv_bytes_per_token,
            balancing_threshold=self.balancing_threshold, slo_ttft_s=self.slo_ttft_s,
            slo_tbt_s=self.slo_tbt_s, seed=self.seed,
            pull_from_instances=self.pull_from_instances, drain_fit=self.drain_fit))


def block_digest(key: str) -> bytes:
    """The 32-byte hash the Conductor's index keeps for a simulated block key."""
    raw = key.encode()
    if len(raw) > DIGEST_SIZE:
        raise InvalidParamsError(f"block key {key!r} is longer than {DIGEST_SIZE} bytes")
    return raw.ljust(DIGEST_SIZE, b"\0")


class Simulator:
    """Runs one :class:`SimConfig` over ``requests`` (see the module docstring)."""

    def __init__(self, config: SimConfig, requests: list[SimRequest]) -> None:
        self.config = config
        self.requests = requests
        self.events = EventQueue()
        self.service = ConductorService(config.conductor, self._now,
                                        cost=config.profile.cost_model())
        self.pool = (None if config.pool_capacity_blocks is None
                     else PoolCache(config.pool_capacity_blocks, config.eviction))
        self.instances: dict[str, SimInstance] = {}
        for role, count in ((Role.PREFILL, config.num_prefill), (Role.DECODE, config.num_decode),
                            (Role.BOTH, config.num_colocated)):
            for n in range(count):
                self._add_instance(f"{'colocated' if role == 'both' else role}-{n:02d}", role)
        self._kv_seq = dict.fromkeys(self.instances, 0)

    def _now(self) -> float:
        return self.events.now

    def _add_instance(self, instance_id: str, role: str) -> None:
        profile = self.config.profile
        self.instances[instance_id] = SimInstance(
            instance_id, role, profile, profile.cost_model(), self.events, self,
            self.config.eviction, self.config.keep_gaps)
        # a decode side's capacity is the KV its batch may hold (admission checks it)
        num_blocks = (profile.cache_blocks if role == Role.PREFILL
                      else profile.decode_kv_tokens // profile.block_tokens)
        self.service.add_instance(instance_id, role, num_blocks)

    # ----- the run
    def run(self) -> list[SimRequest]:
        """Replay every request to its end; the requests, finished or rejected."""
        for request in self.requests:
            self.events.schedule(request.arrival_s, EventKind.ARRIVAL,
                                 _later(self._arrive, request))
        self.events.run()
        self._check_end()
        return self.requests

    def _check_end(self) -> None:
        self.service.check_integrity()
        assert not self.service.requests, "requests still in flight after the last event"
        for request in self.requests:
            assert request.phase in (Phase.FINISHED, Phase.REJECTED), request

    def _arrive(self, request: SimRequest) -> None:
        store_hit = self.pool.matched(request.block_keys) if self.pool is not None else 0
        decision = self.service.route(RouteRequest(
            request.request_id, request.num_prompt_tokens,
            tuple(block_digest(k) for k in request.block_keys), request.num_output_tokens,
            store_hit))
        if not decision.accepted:
            request.rejected_reason = decision.reason
            request.move(Phase.REJECTED)
            return
        assert decision.prefill_id is not None and decision.decode_id is not None
        request.prefill_id, request.decode_id = decision.prefill_id, decision.decode_id
        request.pull_from = decision.pull_from
        request.move(Phase.PREFILLING)
        self.instances[decision.prefill_id].submit_prefill(request)

    # ----- InstanceHooks
    def begin_prefill(self, instance: SimInstance, request: SimRequest) -> float:
        """Reuse the longest prefix at hand now: local, the pool tier, or the instance the
        Conductor chose to pull from. Returns the pull seconds."""
        reusable = request.block_keys[: (request.num_prompt_tokens - 1) // request.block_tokens]
        local = instance.cache.matched(reusable)
        pooled = self.pool.matched(reusable) if self.pool is not None else 0
        remote = pooled
        if request.pull_from not in (None, STORE):
            remote = max(remote, self.instances[request.pull_from].cache.matched(reusable))
        request.local_blocks = local
        request.pulled_blocks = max(0, remote - local)
        if self.pool is not None and pooled > local:
            self.pool.admit(reusable[local:pooled])  # a read touches the pool's order
        return instance.profile.kv_seconds(request.pulled_blocks * request.block_tokens)

    def prefill_done(self, instance: SimInstance, request: SimRequest) -> None:
        self.service.prefill_done(request.request_id)
        if self.pool is not None:  # every prefill instance writes its blocks to the store
            self.pool.admit(request.block_keys)
        if request.num_decode_steps == 0:
            self._finished(request)
        elif instance.role == Role.BOTH:
            request.move(Phase.DECODE_WAITING)
            instance.submit_decode(request)
        else:
            request.move(Phase.TRANSFERRING)
            arrival = self.events.now + instance.profile.kv_seconds(request.last_chunk_tokens)
            self.events.schedule(arrival, EventKind.KV_ARRIVED,
                                 _later(self._kv_arrived, request))

    def _kv_arrived(self, request: SimRequest) -> None:
        decode = self.instances[request.decode_id]
        if self.config.reject_at_decode and self._breaks_tbt(decode, request):
            request.rejected_reason = "tbt_slo_at_decode"
            request.move(Phase.REJECTED)
            self.service.finished(request.request_id)
            return
        request.move(Phase.DECODE_WAITING)
        decode.submit_decode(request)

    def _breaks_tbt(self, decode: SimInstance, request: SimRequest) -> bool:
        """With this request, would the decode instance's next step break the TBT objective,
        or its seats or KV run out (so the request would wait)?"""
        joining = [*decode.decode_queue, request]  # each joins with its prompt + first token
        batch = decode.num_running + len(joining)
        context = decode.running_context + sum(r.num_prompt_tokens + 1 for r in joining)
        reserved = decode.kv_reserved + sum(r.context_tokens for r in joining)
        profile = decode.profile
        return batch > 1 and (decode.cost.decode_step_s(batch, context) > self.config.slo_tbt_s
                              or batch > profile.max_batch or reserved > profile.decode_kv_tokens)

    def decode_done(self, instance: SimInstance, request: SimRequest) -> None:
        self.service.finished(request.request_id)

    def _finished(self, request: SimRequest) -> None:
        request.finish_s = self.events.now
        request.move(Phase.FINISHED)
        self.service.finished(request.request_id)

    def cache_changed(self, instance: SimInstance, stored: list[str],
                      removed: list[str]) -> None:
        """Report the change as the instance's next KV events, in order."""
        events = []
        for kind, keys in (("stored", stored), ("removed", removed)):
            if keys:
                self._kv_seq[instance.instance_id] += 1
                events.append(KVEvent(self._kv_seq[instance.instance_id], kind,
                                      [block_digest(k) for k in keys]))
        applied = self.service.apply_events(instance.instance_id, events)
        assert applied, "simulated KV events are never lost"


def _later(action: Callable[[SimRequest], None], request: SimRequest) -> Callable[[], None]:
    return lambda: action(request)
