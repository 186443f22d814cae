"""The Conductor's Prometheus series: routing, rejections, instances and transfer volume."""

from __future__ import annotations

from kvcake.common.metrics import MetricsRegistry
from kvcake.conductor.types import ConductorStats, PrefillTiming
from kvcake.wire.conductor import Role


class ConductorMetrics:
    def __init__(self) -> None:
        self.registry = registry = MetricsRegistry()
        # seconds summed: predicted, by the cost model alone, observed, and the two errors
        self._end_sums = [0.0] * 5
        self._num_ends = 0
        self._decode_blocks = [0, 0]  # reserved for P/D prompts, held there already
        self.routed = registry.counter("kvcake_conductor_routed_total",
                                       "Requests routed, by policy and the chosen instances",
                                       ("policy", "prefill", "decode"))
        self.rejections = registry.counter("kvcake_conductor_rejections_total",
                                           "Requests turned away at arrival", ("reason",))
        self.cached_tokens = registry.counter(
            "kvcake_conductor_cached_prompt_tokens_total",
            "Prompt tokens whose KV was reused, by where it came from", ("tier",))
        self.predicted_hits = registry.counter(
            "kvcake_conductor_predicted_hit_tokens_total",
            "Prompt tokens routing expected the prefill instance to reuse, by whether it did "
            "(found) or not (missed: a stale index entry or a vanished store block)",
            ("outcome",))
        self.hit_misses = registry.counter(
            "kvcake_conductor_hit_misses_total",
            "Requests whose prefill instance reused less than routing predicted")
        self.decode_cached_blocks = registry.counter(
            "kvcake_conductor_decode_cached_blocks_total",
            "Prompt blocks a decode instance held in its own cache when it reserved room, "
            "which the prefill instance did not write")
        self.transfer_bytes = registry.counter(
            "kvcake_conductor_kv_transfer_bytes_total",
            "KV bytes written from prefill into decode instances")
        self.instances_lost = registry.counter("kvcake_conductor_instances_lost_total",
                                               "Instances dropped for silence or restart")
        self.queue_seconds = registry.gauge(
            "kvcake_conductor_queue_seconds",
            "Predicted prefill seconds queued on an instance", ("instance",))
        self.waiting = registry.gauge("kvcake_instance_waiting_requests",
                                      "Requests waiting in an instance", ("instance",))
        self.running = registry.gauge("kvcake_instance_running_requests",
                                      "Requests in an instance's batch", ("instance",))
        self.free_blocks = registry.gauge("kvcake_instance_free_kv_blocks",
                                          "Free KV blocks of an instance", ("instance",))
        self.blocks = registry.gauge("kvcake_instance_kv_blocks",
                                     "KV blocks of an instance's pool", ("instance",))
        self.tbt_tail = registry.gauge(
            "kvcake_conductor_tbt_tail",
            "Observed TBT (slowest 10 % of gaps) over the predicted decode step, as admission "
            "applies it")
        self.drain = registry.gauge(
            "kvcake_conductor_drain_factor",
            "What a predicted second of an instance's prefill queue (part=queue) and of a "
            "request's own prefill (part=own) take there, as learned from ended prefills",
            ("instance", "part"))
        self.prefill_end_seconds = registry.counter(
            "kvcake_conductor_prefill_end_seconds_total",
            "Seconds from routing to the end of each ended prefill: predicted (with the "
            "drain fit), by the cost model alone (cost_model), and observed", ("kind",))
        self.prefill_ends = registry.counter(
            "kvcake_conductor_prefill_ends_total", "Prefills whose end was timed")
        self.indexed_blocks = registry.gauge(
            "kvcake_conductor_indexed_blocks",
            "Prefix blocks the global index holds per instance", ("instance",))

    def count_cached(self, num_cached_tokens: int, num_store_tokens: int) -> None:
        self.cached_tokens.inc(num_cached_tokens - num_store_tokens, tier="local")
        self.cached_tokens.inc(num_store_tokens, tier="store")

    def count_hit(self, predicted: int, missed: int) -> None:
        self.predicted_hits.inc(predicted - missed, outcome="found")
        self.predicted_hits.inc(missed, outcome="missed")
        if missed:
            self.hit_misses.inc()

    def count_prefill_end(self, timing: PrefillTiming) -> None:
        self.prefill_ends.inc()
        self.prefill_end_seconds.inc(timing.predicted_s, kind="predicted")
        self.prefill_end_seconds.inc(timing.cost_model_s, kind="cost_model")
        self.prefill_end_seconds.inc(timing.observed_s, kind="observed")
        self._num_ends += 1
        for i, seconds in enumerate((timing.predicted_s, timing.cost_model_s,
                                     timing.observed_s,
                                     abs(timing.predicted_s - timing.observed_s),
                                     abs(timing.cost_model_s - timing.observed_s))):
            self._end_sums[i] += seconds

    def count_reserved(self, num_blocks: int, num_cached_blocks: int) -> None:
        """A decode instance reserved ``num_blocks`` for a prompt, the first
        ``num_cached_blocks`` of them holding its KV already."""
        self._decode_blocks[0] += num_blocks
        self._decode_blocks[1] += num_cached_blocks
        self.decode_cached_blocks.inc(num_cached_blocks)

    def pd_summary(self) -> str:
        """The closing line on what decode instances already held of P/D prompts ("" when
        no prompt went through P/D)."""
        reserved, cached = self._decode_blocks
        if not reserved:
            return ""
        return (f"kvcake P/D: decode instances held {cached} of {reserved} reserved prompt "
                f"blocks in their own caches (not written)")

    def prefill_summary(self, stats: ConductorStats) -> str:
        """The closing line: how long prefills took to end against their predictions, and
        each prefill instance's drain fit."""
        drains = ", ".join(f"{instance_id} {inst.drain[0]:.2f}/{inst.drain[1]:.2f}"
                           for instance_id, inst in stats.instances.items()
                           if inst.role != Role.DECODE)
        if not self._num_ends:
            return f"kvcake TTFT model: no prefill ended; drain (queue/own): {drains}"
        predicted, cost_model, observed, error, cost_error = (
            total / self._num_ends for total in self._end_sums)
        return (f"kvcake TTFT model: {self._num_ends} prefills ended {observed:.2f} s after "
                f"routing on average, predicted {predicted:.2f} s, off by {error:.2f} s on "
                f"average (the cost model alone: {cost_model:.2f} s, off by {cost_error:.2f} s)"
                f"; drain (queue/own): {drains}")

    def render(self, stats: ConductorStats) -> str:
        self.tbt_tail.set(stats.tbt_tail)
        for instance_id, inst in stats.instances.items():
            self.queue_seconds.set(inst.queue_s, instance=instance_id)
            for part, factor in zip(("queue", "own"), inst.drain, strict=True):
                self.drain.set(factor, instance=instance_id, part=part)
            self.indexed_blocks.set(inst.num_indexed_blocks, instance=instance_id)
            if inst.load is not None:
                self.waiting.set(inst.load.num_waiting, instance=instance_id)
                self.running.set(inst.load.num_running, instance=instance_id)
                self.free_blocks.set(inst.load.num_free_blocks, instance=instance_id)
                self.blocks.set(inst.load.num_blocks, instance=instance_id)
        return self.registry.render()
