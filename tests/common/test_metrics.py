"""The Prometheus text registry: exact output for each metric kind, and refused misuse."""

from __future__ import annotations

import math

import pytest

from kvcake.common.errors import InvalidParamsError
from kvcake.common.metrics import MetricsRegistry, format_value


def test_empty_registry_renders_nothing() -> None:
    assert MetricsRegistry().render() == ""


def test_counter_with_labels_renders_sorted_escaped_series() -> None:
    registry = MetricsRegistry()
    requests = registry.counter("kvcake_x_requests_total", "Requests by op", ("op", "status"))
    requests.inc(op="put", status="200")
    requests.inc(2, op="get", status="200")
    requests.inc(op="get", status='a"b\\c\nd')
    requests.inc(op="put", status="200")
    assert registry.render() == (
        "# HELP kvcake_x_requests_total Requests by op\n"
        "# TYPE kvcake_x_requests_total counter\n"
        'kvcake_x_requests_total{op="get",status="200"} 2\n'
        'kvcake_x_requests_total{op="get",status="a\\"b\\\\c\\nd"} 1\n'
        'kvcake_x_requests_total{op="put",status="200"} 2\n'
    )
    assert requests.value(op="put", status="200") == 2
    assert requests.value(op="put", status="500") == 0


def test_unlabelled_series_start_at_zero_and_labelled_ones_empty() -> None:
    registry = MetricsRegistry()
    registry.counter("kvcake_x_bytes_total", "Bytes moved")
    registry.gauge("kvcake_x_queue", "Queued requests", ("instance",))
    assert registry.render() == (
        "# HELP kvcake_x_bytes_total Bytes moved\n"
        "# TYPE kvcake_x_bytes_total counter\n"
        "kvcake_x_bytes_total 0\n"
        "# HELP kvcake_x_queue Queued requests\n"
        "# TYPE kvcake_x_queue gauge\n"
    )


def test_gauge_goes_up_down_and_is_set() -> None:
    registry = MetricsRegistry()
    running = registry.gauge("kvcake_x_running", "Running requests")
    queue = registry.gauge("kvcake_x_queue", "Queued requests", ("instance",))
    running.inc()
    running.inc(2)
    running.dec()
    queue.set(2.5, instance="p1")
    queue.set(7, instance="p0")
    assert registry.render() == (
        "# HELP kvcake_x_running Running requests\n"
        "# TYPE kvcake_x_running gauge\n"
        "kvcake_x_running 2\n"
        "# HELP kvcake_x_queue Queued requests\n"
        "# TYPE kvcake_x_queue gauge\n"
        'kvcake_x_queue{instance="p0"} 7\n'
        'kvcake_x_queue{instance="p1"} 2.5\n'
    )


def test_histogram_buckets_are_cumulative_with_inf_sum_and_count() -> None:
    registry = MetricsRegistry()
    latency = registry.histogram("kvcake_x_seconds", "Latency", (0.25, 0.5, 1))
    for value in (0.125, 0.25, 0.5, 3.0):  # 0.25 and 0.5 sit on bounds: le is inclusive
        latency.observe(value)
    assert registry.render() == (
        "# HELP kvcake_x_seconds Latency\n"
        "# TYPE kvcake_x_seconds histogram\n"
        'kvcake_x_seconds_bucket{le="0.25"} 2\n'
        'kvcake_x_seconds_bucket{le="0.5"} 3\n'
        'kvcake_x_seconds_bucket{le="1.0"} 3\n'
        'kvcake_x_seconds_bucket{le="+Inf"} 4\n'
        "kvcake_x_seconds_sum 3.875\n"
        "kvcake_x_seconds_count 4\n"
    )
    assert latency.count() == 4


def test_histogram_with_labels_puts_le_last() -> None:
    registry = MetricsRegistry()
    transfer = registry.histogram("kvcake_x_transfer_seconds", "Transfer time", (1.0,),
                                  ("tier",))
    transfer.observe(0.5, tier="dram")
    transfer.observe(2.0, tier="ssd")
    assert registry.render().splitlines()[2:] == [
        'kvcake_x_transfer_seconds_bucket{tier="dram",le="1.0"} 1',
        'kvcake_x_transfer_seconds_bucket{tier="dram",le="+Inf"} 1',
        'kvcake_x_transfer_seconds_sum{tier="dram"} 0.5',
        'kvcake_x_transfer_seconds_count{tier="dram"} 1',
        'kvcake_x_transfer_seconds_bucket{tier="ssd",le="1.0"} 0',
        'kvcake_x_transfer_seconds_bucket{tier="ssd",le="+Inf"} 1',
        'kvcake_x_transfer_seconds_sum{tier="ssd"} 2.0',
        'kvcake_x_transfer_seconds_count{tier="ssd"} 1',
    ]
    assert (transfer.count(tier="dram"), transfer.count(tier="disk")) == (1, 0)


def test_help_text_is_escaped() -> None:
    registry = MetricsRegistry()
    registry.gauge("kvcake_x_g", "two\nlines and a \\ backslash")
    assert registry.render().splitlines()[0] == (
        "# HELP kvcake_x_g two\\nlines and a \\\\ backslash")


@pytest.mark.parametrize(("value", "text"), [
    (3, "3"), (3.0, "3.0"), (0.1, "0.1"), (math.inf, "+Inf"), (-math.inf, "-Inf"),
    (math.nan, "NaN"),
])
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text


def test_misuse_is_refused_with_a_clear_message() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("kvcake_x_total", "Things", ("kind",))
    with pytest.raises(InvalidParamsError, match=r"takes labels \['kind'\], got \['kinds'\]"):
        counter.inc(kinds="a")
    with pytest.raises(InvalidParamsError, match="cannot go down"):
        counter.inc(-1, kind="a")
    with pytest.raises(InvalidParamsError, match="kvcake_x_total is already registered"):
        registry.gauge("kvcake_x_total", "Again")
    with pytest.raises(InvalidParamsError, match="not a valid Prometheus name"):
        registry.gauge("kvcake-x", "Dash")
    with pytest.raises(InvalidParamsError, match="label name 'le' is not allowed"):
        registry.histogram("kvcake_x_h", "H", (1.0,), ("le",))
    with pytest.raises(InvalidParamsError, match="label name '__x' is not allowed"):
        registry.gauge("kvcake_x_g", "G", ("__x",))
    with pytest.raises(InvalidParamsError, match="label names repeat"):
        registry.gauge("kvcake_x_g", "G", ("a", "a"))
    with pytest.raises(InvalidParamsError, match="buckets must increase strictly"):
        registry.histogram("kvcake_x_h", "H", (1.0, 1.0))
    with pytest.raises(InvalidParamsError, match="needs finite bucket bounds"):
        registry.histogram("kvcake_x_h", "H", (1.0, math.inf))
    assert registry.render().count("# TYPE") == 1  # refused metrics were not registered
