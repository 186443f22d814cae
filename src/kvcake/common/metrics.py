"""A small Prometheus registry: counters, gauges and fixed-bucket histograms, rendered as text.

Every component that serves ``/metrics`` registers its series here and appends
:meth:`MetricsRegistry.render` to its scrape. The output is the Prometheus text format 0.0.4,
the same bytes for the same state::

    # HELP kvcake_api_ttft_seconds Time to first token
    # TYPE kvcake_api_ttft_seconds histogram
    kvcake_api_ttft_seconds_bucket{le="0.1"} 2        <- cumulative: every value <= 0.1
    kvcake_api_ttft_seconds_bucket{le="+Inf"} 3       <- always equals _count
    kvcake_api_ttft_seconds_sum 0.55
    kvcake_api_ttft_seconds_count 3

Metrics render in registration order and their label sets sorted by value. Integer values
render as integers and floats with ``repr`` (``2`` vs ``2.0``). Updates take a lock, so
threads may share a metric.
"""

from __future__ import annotations

import math
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import TypeVar

from kvcake.common.errors import InvalidParamsError

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
LabelValues = tuple[str, ...]
M = TypeVar("M", bound="Metric")


class Metric(ABC):
    """One named series family; ``labels`` are its label names, each sample gives them all."""

    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        _check_names(name, labels, reserved=("le",) if self.kind == "histogram" else ())
        self.name = name
        self.help_text = help_text
        self.label_names: LabelValues = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        """The label values in declared order; InvalidParamsError when the names differ."""
        if set(labels) != set(self.label_names):
            raise InvalidParamsError(f"metric {self.name} takes labels "
                                     f"{list(self.label_names)}, got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.label_names)

    def render(self) -> list[str]:
        """The HELP and TYPE lines, then every sample line."""
        help_text = self.help_text.replace("\\", "\\\\").replace("\n", "\\n")
        with self._lock:
            samples = list(self._samples())
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}", *samples]

    @abstractmethod
    def _samples(self) -> Iterable[str]:
        """The sample lines, called under the lock."""

    def _series(self, suffix: str, key: LabelValues, value: float,
                extra: tuple[tuple[str, str], ...] = ()) -> str:
        """One sample line: ``name{label="value",...} value``, no braces without labels."""
        pairs = (*zip(self.label_names, key, strict=True), *extra)
        labels = ",".join(f'{label}="{_escape(text)}"' for label, text in pairs)
        braces = f"{{{labels}}}" if labels else ""
        return f"{self.name}{suffix}{braces} {format_value(value)}"


class _Scalar(Metric):
    """A value per label set: what counters and gauges share."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        # an unlabelled series exists from the start: a scrape shows 0, not nothing
        self._values: dict[LabelValues, float] = {} if labels else {(): 0}

    def value(self, **labels: str) -> float:
        """The current value of one series (0 if it was never touched)."""
        with self._lock:
            return self._values.get(self._key(labels), 0)

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def _samples(self) -> Iterable[str]:
        for key in sorted(self._values):
            yield self._series("", key, self._values[key])


class Counter(_Scalar):
    """A total that only goes up (requests, tokens, bytes); name it ``..._total``."""

    kind = "counter"

    def inc(self, amount: float = 1, **labels: str) -> None:
        """Add ``amount`` (>= 0; InvalidParamsError otherwise) to the series ``labels``."""
        if amount < 0:
            raise InvalidParamsError(f"counter {self.name} cannot go down (inc by {amount})")
        self._add(amount, labels)


class Gauge(_Scalar):
    """A value that goes up and down (running requests, queue length)."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = value

    def inc(self, amount: float = 1, **labels: str) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1, **labels: str) -> None:
        self._add(-amount, labels)


class Histogram(Metric):
    """Counts of observations per bucket upper bound, plus their sum and count.

    ``buckets`` are strictly increasing finite upper bounds; ``+Inf`` is added. A value equal
    to a bound falls in that bucket (Prometheus' ``le``: less than or equal).
    """

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float],
                 labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        _check_buckets(name, buckets)
        self.buckets: tuple[float, ...] = (*buckets, math.inf)
        self._states: dict[LabelValues, _HistogramState] = {}
        if not labels:
            self._states[()] = _HistogramState(len(self.buckets))

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        index = next(i for i, bound in enumerate(self.buckets) if value <= bound)
        with self._lock:
            state = self._states.setdefault(key, _HistogramState(len(self.buckets)))
            state.counts[index] += 1
            state.total += value

    def count(self, **labels: str) -> int:
        """How many values the series ``labels`` has observed."""
        with self._lock:
            state = self._states.get(self._key(labels))
            return sum(state.counts) if state else 0

    def _samples(self) -> Iterable[str]:
        for key in sorted(self._states):
            state = self._states[key]
            cumulative = 0
            for bound, count in zip(self.buckets, state.counts, strict=True):
                cumulative += count
                yield self._series("_bucket", key, cumulative, (("le", _format_bound(bound)),))
            yield self._series("_sum", key, state.total)
            yield self._series("_count", key, cumulative)


class _HistogramState:
    def __init__(self, num_buckets: int) -> None:
        self.counts = [0] * num_buckets  # per bucket, not cumulative
        self.total = 0.0


class MetricsRegistry:
    """The metrics of one component, in registration order; names are unique."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        return self._register(Counter(name, help_text, labels))

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
        return self._register(Gauge(name, help_text, labels))

    def histogram(self, name: str, help_text: str, buckets: Sequence[float],
                  labels: Sequence[str] = ()) -> Histogram:
        return self._register(Histogram(name, help_text, buckets, labels))

    def _register(self, metric: M) -> M:
        if metric.name in self._metrics:
            raise InvalidParamsError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        """Every metric in the text format, newline-terminated ("" when there are none)."""
        lines = [line for metric in self._metrics.values() for line in metric.render()]
        return "".join(f"{line}\n" for line in lines)


def format_value(value: float) -> str:
    """A sample value as Prometheus reads it: ints as ints, floats by repr, ``+Inf``, ``NaN``."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _format_bound(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _check_names(name: str, labels: Sequence[str], reserved: Sequence[str]) -> None:
    if not _NAME.fullmatch(name):
        raise InvalidParamsError(f"metric name {name!r} is not a valid Prometheus name")
    for label in labels:
        if not _LABEL.fullmatch(label) or label.startswith("__") or label in reserved:
            raise InvalidParamsError(f"metric {name}: label name {label!r} is not allowed")
    if len(set(labels)) != len(labels):
        raise InvalidParamsError(f"metric {name}: label names repeat: {list(labels)}")


def _check_buckets(name: str, buckets: Sequence[float]) -> None:
    bounds = list(buckets)
    if not bounds or any(not math.isfinite(b) for b in bounds):
        raise InvalidParamsError(f"histogram {name} needs finite bucket bounds, got {bounds}")
    if any(b >= c for b, c in pairwise(bounds)):
        raise InvalidParamsError(f"histogram {name}: buckets must increase strictly, "
                                 f"got {bounds}")
