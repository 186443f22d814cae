"""Predicted prefill, decode-step and transfer times, fitted online from measured samples.

Each model is linear in a few features of the work. Until a model has as many samples as
coefficients it answers with :class:`CostDefaults`; afterwards it solves least squares over a
bounded window of the most recent samples, anchored on the defaults::

    prefill_s(new, cached) = a + b·new + c·new² + d·new·cached     (0 when new == 0)
    decode_step_s(batch, context) = a + b·batch + c·context
    transfer_s(num_bytes) = num_bytes / bandwidth  (bandwidth = Σ bytes / Σ seconds)

Samples that cannot pin every coefficient (all with the same prompt length, say) leave the
undetermined directions at the defaults instead of failing. Every coefficient but the fixed
cost stays >= 0, so more work never predicts less time; predictions are never negative.

The TBT objective is not a step time: it is the mean of a request's slowest 10 % of token
gaps as its client sees them, which interference (prefill sharing the machine, the trip
through the Conductor) stretches beyond the engine's mean step. ``tbt_tail`` learns that
stretch from finished requests: the 90th percentile of observed TBT / predicted step over a
window, so that a request admitted at ``step * tail <= SLO`` meets the objective about nine
times in ten, the attainment admission control aims at.

The time from routing to a prefill's end is not a sum of isolated prefills either: an
engine batches the chunks of several prompts into one step (with decodes, when colocated)
and spends time between steps, so a burst drains slower than its prefills add up to (or
faster, where the samples already hold queueing). :class:`DrainFit` learns, per prefill
instance, from the requests whose prefill ended there::

    observed_s ≈ queue_factor·queue_s + own_factor·own_s
    (each factor within ``SCALE_BOUNDS``; 1 until ``DRAIN_MIN_SAMPLES`` prefills ended)

``queue_s`` the predicted prefill seconds queued ahead of the request when it was routed,
``own_s`` its own (KV pull plus prefill). The Conductor prices that instance's queue and
prefill with them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields

from kvcake.common.errors import InvalidParamsError
from kvcake.common.latency import percentile
from kvcake.wire.conductor import DecodeSample, PrefillSample, TransferSample

Vector = tuple[float, ...]
_SINGULAR = 1e-12  # a pivot this small, relative to the largest diagonal entry, is a zero
_RIDGE = 1e-9  # added (relative) to the diagonal when the samples leave a direction free
TAIL_MIN_SAMPLES = 8  # finished requests before ``tbt_tail`` departs from 1
TAIL_MAX = 4.0
TAIL_PERCENTILE = 90
DRAIN_MIN_SAMPLES = 4  # ended prefills before an instance's drain fit departs from (1, 1)
DRAIN_WINDOW = 64
SCALE_BOUNDS = (0.1, 10.0)  # a batching engine drained a queue 4x faster than its sum


@dataclass(frozen=True)
class CostDefaults:
    """What the models answer before samples arrive (SmolLM2-135M on 2 CPU cores).

    prefill_*: seconds fixed per step, per new token, per new token squared, and per
        (new token * cached token) of attention over the cached context.
    decode_*: seconds fixed per step, per request in the batch, per context token.
    bandwidth_bytes_per_s: KV transfer rate (> 0).
    window: samples each model keeps, most recent first out (>= 4).
    """

    prefill_fixed_s: float = 0.005
    prefill_per_token_s: float = 1.0 / 750
    prefill_per_token2_s: float = 0.0
    prefill_per_token_cached_s: float = 0.0
    decode_fixed_s: float = 0.035
    decode_per_request_s: float = 0.004
    decode_per_context_token_s: float = 0.0
    bandwidth_bytes_per_s: float = 2e9
    window: int = 256

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidParamsError(f"{field.name} must be finite and >= 0, got {value}")
        if self.bandwidth_bytes_per_s <= 0:
            raise InvalidParamsError(
                f"bandwidth_bytes_per_s must be > 0, got {self.bandwidth_bytes_per_s}")
        if self.window < 4:
            raise InvalidParamsError(f"window must be >= 4, got {self.window}")


def _check_count(name: str, value: int, minimum: int = 0) -> None:
    if value < minimum:
        raise InvalidParamsError(f"{name} must be >= {minimum}, got {value}")


def _check_seconds(seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds >= 0):
        raise InvalidParamsError(f"seconds must be finite and >= 0, got {seconds}")


class CostModel:
    """Online time predictions; see the module docstring. Not thread-safe."""

    def __init__(self, defaults: CostDefaults | None = None) -> None:
        self.defaults = defaults or CostDefaults()
        d = self.defaults
        self._prefill = _LinearFit((d.prefill_fixed_s, d.prefill_per_token_s,
                                    d.prefill_per_token2_s, d.prefill_per_token_cached_s),
                                   d.window)
        self._decode = _LinearFit((d.decode_fixed_s, d.decode_per_request_s,
                                   d.decode_per_context_token_s), d.window)
        self._transfers: deque[tuple[int, float]] = deque(maxlen=d.window)
        self._num_transfers = 0
        self._tails: deque[float] = deque(maxlen=d.window)
        self._num_tails = 0

    # ----- predictions
    def prefill_s(self, num_new_tokens: int, num_cached_tokens: int) -> float:
        """Seconds to compute ``num_new_tokens`` on top of ``num_cached_tokens`` already held."""
        _check_count("num_new_tokens", num_new_tokens)
        _check_count("num_cached_tokens", num_cached_tokens)
        if num_new_tokens == 0:
            return 0.0
        return self._prefill.predict(_prefill_features(num_new_tokens, num_cached_tokens))

    def decode_step_s(self, batch_size: int, num_context_tokens: int) -> float:
        """Seconds of one decode step (the TBT) for this batch; 0 for an empty batch."""
        _check_count("batch_size", batch_size)
        _check_count("num_context_tokens", num_context_tokens)
        if batch_size == 0:
            return 0.0
        return self._decode.predict(_decode_features(batch_size, num_context_tokens))

    def transfer_s(self, num_bytes: int) -> float:
        """Seconds to move ``num_bytes`` of KV at the recently measured bandwidth."""
        _check_count("num_bytes", num_bytes)
        return num_bytes / self.bandwidth_bytes_per_s

    @property
    def bandwidth_bytes_per_s(self) -> float:
        total_bytes = sum(n for n, _ in self._transfers)
        total_s = sum(s for _, s in self._transfers)
        if total_bytes == 0 or total_s == 0:
            return self.defaults.bandwidth_bytes_per_s
        return total_bytes / total_s

    @property
    def tbt_tail(self) -> float:
        """Observed TBT over predicted step time of recent finished requests: the
        ``TAIL_PERCENTILE`` th percentile, within [1, ``TAIL_MAX``]; 1 until
        ``TAIL_MIN_SAMPLES`` have finished."""
        tail = percentile(self._tails, TAIL_PERCENTILE)
        if tail is None or len(self._tails) < TAIL_MIN_SAMPLES:
            return 1.0
        return min(TAIL_MAX, max(1.0, tail))

    # ----- samples
    def add_tbt(self, predicted_s: float, observed_s: float) -> None:
        """Learn from one finished request: the step time predicted when it was routed, and
        its TBT as the objective measures it."""
        _check_seconds(predicted_s)
        _check_seconds(observed_s)
        if predicted_s > 0:
            self._tails.append(observed_s / predicted_s)
            self._num_tails += 1

    def add_prefill(self, sample: PrefillSample) -> None:
        """Learn from one prefill step; ``InvalidParamsError`` for negative or empty work."""
        _check_count("num_new_tokens", sample.num_new_tokens, 1)
        _check_count("num_cached_tokens", sample.num_cached_tokens)
        _check_seconds(sample.seconds)
        features = _prefill_features(sample.num_new_tokens, sample.num_cached_tokens)
        self._prefill.add(features, sample.seconds)

    def add_decode(self, sample: DecodeSample) -> None:
        """Learn from one decode step; ``InvalidParamsError`` for an empty batch."""
        _check_count("batch_size", sample.batch_size, 1)
        _check_count("num_context_tokens", sample.num_context_tokens)
        _check_seconds(sample.seconds)
        self._decode.add(_decode_features(sample.batch_size, sample.num_context_tokens),
                         sample.seconds)

    def add_transfer(self, sample: TransferSample) -> None:
        """Learn from one transfer; ``InvalidParamsError`` for negative numbers."""
        _check_count("num_bytes", sample.num_bytes)
        _check_seconds(sample.seconds)
        self._transfers.append((sample.num_bytes, sample.seconds))
        self._num_transfers += 1

    @property
    def num_samples(self) -> dict[str, int]:
        """Samples received so far by kind (``prefill``, ``decode``, ``transfer``, ``tbt``)."""
        return {"prefill": self._prefill.num_added, "decode": self._decode.num_added,
                "transfer": self._num_transfers, "tbt": self._num_tails}

    def prefill_coefficients(self) -> Vector:
        """(a, b, c, d) of the prefill model in use."""
        return self._prefill.coefficients()

    def decode_coefficients(self) -> Vector:
        """(a, b, c) of the decode model in use."""
        return self._decode.coefficients()


def _prefill_features(new: int, cached: int) -> Vector:
    return (1.0, float(new), float(new) * new, float(new) * cached)


def _decode_features(batch: int, context: int) -> Vector:
    return (1.0, float(batch), float(context))


class DrainFit:
    """How one prefill instance's queue drains; see the module docstring."""

    def __init__(self, window: int = DRAIN_WINDOW) -> None:
        self._fit = _LinearFit((1.0, 1.0), window, first_work=0)

    def add(self, queue_s: float, own_s: float, observed_s: float) -> None:
        """One request whose prefill ended ``observed_s`` after it was routed."""
        for seconds in (queue_s, own_s, observed_s):
            _check_seconds(seconds)
        if queue_s + own_s > 0:
            self._fit.add((queue_s, own_s), observed_s)

    @property
    def num_added(self) -> int:
        return self._fit.num_added

    def coefficients(self) -> tuple[float, float]:
        """(queue factor, own factor): what a predicted second of the queue ahead, and of a
        request's own prefill, takes."""
        if len(self._fit.samples) < DRAIN_MIN_SAMPLES:
            return 1.0, 1.0
        low, high = SCALE_BOUNDS
        queue_factor, own_factor = (min(high, max(low, c)) for c in self._fit.coefficients())
        return queue_factor, own_factor


class _LinearFit:
    """``y ≈ coefficients · x`` over a window of samples, refitted lazily when asked;
    coefficients from ``first_work`` on stay >= 0."""

    def __init__(self, prior: Vector, window: int, first_work: int = 1) -> None:
        self.prior = prior
        self.first_work = first_work
        self.samples: deque[tuple[Vector, float]] = deque(maxlen=window)
        self.num_added = 0
        self._coefficients = prior
        self._stale = False

    def add(self, features: Vector, seconds: float) -> None:
        self.samples.append((features, seconds))
        self.num_added += 1
        self._stale = True

    def predict(self, features: Vector) -> float:
        return max(0.0, sum(c * x for c, x in zip(self.coefficients(), features, strict=True)))

    def coefficients(self) -> Vector:
        if self._stale:
            enough = len(self.samples) >= len(self.prior)
            self._coefficients = self._fit() if enough else self.prior
            self._stale = False
        return self._coefficients

    def _fit(self) -> Vector:
        """Least squares with every work coefficient (all but the fixed cost) >= 0: a
        negative one, fitted to a few noisy samples, makes more work predict less time and
        a long prompt cost nothing. Such a coefficient is pinned at 0 and the rest refitted."""
        pinned: set[int] = set()
        while True:
            coefficients = self._fit_free(pinned)
            negative = [j for j in range(self.first_work, len(coefficients))
                        if j not in pinned and coefficients[j] < 0.0]
            if not negative:
                return coefficients
            pinned.add(min(negative, key=lambda j: coefficients[j]))

    def _fit_free(self, pinned: set[int]) -> Vector:
        """Least squares for the offset from the prior, on columns scaled to ≤ 1 (so that
        ``new²`` and ``new·cached`` do not swamp the constant term in the normal equations);
        the ``pinned`` columns' coefficients are 0."""
        prior = tuple(0.0 if j in pinned else p for j, p in enumerate(self.prior))
        free = [j for j in range(len(prior)) if j not in pinned]
        scale = {j: max(abs(x[j]) for x, _ in self.samples) or 1.0 for j in free}
        rows = [([x[j] / scale[j] for j in free], y - _dot(prior, x)) for x, y in self.samples]
        offset = _least_squares(rows, len(free))
        coefficients = list(prior)
        for i, j in enumerate(free):
            coefficients[j] += offset[i] / scale[j]
        return tuple(coefficients)


def _least_squares(rows: list[tuple[list[float], float]], k: int) -> list[float]:
    """``argmin |R·o - y|``; a direction the rows leave free stays near 0 (a small ridge)."""
    gram = [[sum(r[i] * r[j] for r, _ in rows) for j in range(k)] for i in range(k)]
    moment = [sum(r[i] * y for r, y in rows) for i in range(k)]
    offset = _solve(gram, moment)
    if offset is None:
        ridge = _RIDGE * max((gram[i][i] for i in range(k)), default=0.0)
        offset = _solve([[g + (ridge if i == j else 0.0) for j, g in enumerate(row)]
                         for i, row in enumerate(gram)], moment) or [0.0] * k
    return offset


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """``matrix · x = rhs`` by Gaussian elimination with partial pivoting; ``None`` when
    singular. ``matrix`` is symmetric positive semi-definite (a Gram matrix)."""
    k = len(rhs)
    rows = [[*row, value] for row, value in zip(matrix, rhs, strict=True)]
    tolerance = _SINGULAR * max((abs(rows[i][i]) for i in range(k)), default=0.0)
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(rows[r][col]))
        if abs(rows[pivot][col]) <= tolerance:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(col + 1, k):
            factor = rows[r][col] / rows[col][col]
            rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col], strict=True)]
    solution = [0.0] * k
    for r in reversed(range(k)):
        tail = sum(rows[r][c] * solution[c] for c in range(r + 1, k))
        solution[r] = (rows[r][k] - tail) / rows[r][r]
    return solution
