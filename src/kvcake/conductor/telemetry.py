"""The Conductor's Prometheus series: routing, rejections, instances and transfer volume."""

from __future__ import annotations

from kvcake.common.metrics import MetricsRegistry
from kvcake.conductor.types import ConductorStats


class ConductorMetrics:
    def __init__(self) -> None:
        self.registry = registry = MetricsRegistry()
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

    def render(self, stats: ConductorStats) -> str:
        self.tbt_tail.set(stats.tbt_tail)
        for instance_id, inst in stats.instances.items():
            self.queue_seconds.set(inst.queue_s, instance=instance_id)
            self.indexed_blocks.set(inst.num_indexed_blocks, instance=instance_id)
            if inst.load is not None:
                self.waiting.set(inst.load.num_waiting, instance=instance_id)
                self.running.set(inst.load.num_running, instance=instance_id)
                self.free_blocks.set(inst.load.num_free_blocks, instance=instance_id)
                self.blocks.set(inst.load.num_blocks, instance=instance_id)
        return self.registry.render()
