"""CostModel: exact recovery of known coefficients, defaults, windows, degenerate samples."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from kvcake.common.errors import InvalidParamsError
from kvcake.conductor import CostDefaults, CostModel, DecodeSample, PrefillSample, TransferSample
from kvcake.conductor.cost import DrainFit

PREFILL = (0.02, 1.1e-3, 3e-8, 2e-9)  # a + b·new + c·new² + d·new·cached
DECODE = (0.03, 2e-3, 1e-7)  # a + b·batch + c·context


def prefill_truth(new: int, cached: int, coefficients: tuple[float, ...] = PREFILL) -> float:
    a, b, c, d = coefficients
    return a + b * new + c * new * new + d * new * cached


def decode_truth(batch: int, context: int) -> float:
    a, b, c = DECODE
    return a + b * batch + c * context


def assert_invalid(call: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidParamsError) as caught:
        call()
    assert str(caught.value) == f"INVALID_PARAMS: {message}"


def feed_prefill(model: CostModel, count: int, coefficients: tuple[float, ...] = PREFILL,
                 seed: int = 1) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        new, cached = rng.randint(1, 4096), rng.randint(0, 8192)
        model.add_prefill(PrefillSample(new, cached, prefill_truth(new, cached, coefficients)))


def test_prefill_fit_recovers_known_coefficients() -> None:
    model = CostModel()
    feed_prefill(model, 300)
    assert model.prefill_coefficients() == pytest.approx(PREFILL, rel=1e-6)
    rng = random.Random(2)
    for _ in range(200):  # also outside the sampled range
        new, cached = rng.randint(1, 16384), rng.randint(0, 32768)
        assert model.prefill_s(new, cached) == pytest.approx(prefill_truth(new, cached),
                                                             rel=1e-6)


def test_decode_fit_recovers_known_coefficients() -> None:
    model = CostModel()
    for batch in range(1, 17):
        for per_request in (100, 2_000, 30_000):
            context = batch * per_request
            model.add_decode(DecodeSample(batch, context, decode_truth(batch, context)))
    assert model.decode_coefficients() == pytest.approx(DECODE, rel=1e-6)
    assert model.decode_step_s(40, 1_000_000) == pytest.approx(decode_truth(40, 1_000_000),
                                                               rel=1e-6)


def test_defaults_until_there_are_as_many_samples_as_coefficients() -> None:
    defaults = CostDefaults(prefill_fixed_s=0.0, prefill_per_token_s=0.001,
                            decode_fixed_s=0.01, decode_per_request_s=0.01)
    model = CostModel(defaults)
    feed_prefill(model, 3)
    for batch in (1, 2):
        model.add_decode(DecodeSample(batch, 100, 1.0))
    assert model.prefill_s(500, 0) == pytest.approx(0.5)
    assert model.decode_step_s(3, 0) == pytest.approx(0.04)
    assert model.num_samples == {"prefill": 3, "decode": 2, "transfer": 0, "tbt": 0}
    feed_prefill(model, 1, seed=9)  # the fourth sample: now fitted
    assert model.prefill_coefficients() != (0.0, 0.001, 0.0, 0.0)


def test_nothing_to_compute_costs_nothing() -> None:
    model = CostModel()
    assert model.prefill_s(0, 4096) == 0.0
    assert model.decode_step_s(0, 0) == 0.0
    assert model.transfer_s(0) == 0.0


def test_samples_that_all_look_alike_fit_what_they_show_and_keep_defaults_elsewhere() -> None:
    model = CostModel()
    for _ in range(10):
        model.add_prefill(PrefillSample(512, 0, 0.7))
        model.add_decode(DecodeSample(4, 4000, 0.08))
    assert model.prefill_s(512, 0) == pytest.approx(0.7, rel=1e-6)
    assert model.decode_step_s(4, 4000) == pytest.approx(0.08, rel=1e-6)
    assert model.prefill_s(1024, 0) > model.prefill_s(512, 0)  # still grows with the prompt


def test_more_work_never_predicts_less_time() -> None:
    model = CostModel()
    for batch in range(1, 6):  # noisy samples that fall with the batch size
        model.add_decode(DecodeSample(batch, 0, 0.1 - 0.01 * batch))
    steps = [model.decode_step_s(batch, 0) for batch in (1, 5, 20, 200)]
    assert steps == sorted(steps) and steps[0] > 0.0
    assert model.decode_step_s(3, 0) == pytest.approx(0.07)  # their mean: no slope left


def test_a_concave_prefill_fit_does_not_make_long_prompts_free() -> None:
    """Start-up profiles of 32..512 tokens on a loaded machine fitted ``new²`` negative, and a
    1,000-token prompt was predicted to take 0 s (its decode seat lapsed while it ran)."""
    model = CostModel()
    for new in (32, 64, 64, 128, 512):
        model.add_prefill(PrefillSample(new, 0, 0.06 * new - 1e-4 * new * new))
    _, b, c, d = model.prefill_coefficients()
    assert b > 0.0 and c >= 0.0 and d >= 0.0
    long, profiled = model.prefill_s(1000, 0), model.prefill_s(512, 0)
    assert long > profiled > 0.0


def test_the_window_forgets_old_samples() -> None:
    model = CostModel(CostDefaults(window=64))
    feed_prefill(model, 64)
    slower = tuple(2 * c for c in PREFILL)
    feed_prefill(model, 64, slower, seed=3)
    assert model.prefill_coefficients() == pytest.approx(slower, rel=1e-6)
    assert model.num_samples["prefill"] == 128


def test_bandwidth_is_total_bytes_over_total_seconds() -> None:
    model = CostModel(CostDefaults(bandwidth_bytes_per_s=1e9))
    assert model.transfer_s(2_000_000_000) == pytest.approx(2.0)
    model.add_transfer(TransferSample(100_000_000, 0.5))
    model.add_transfer(TransferSample(300_000_000, 1.5))
    assert model.bandwidth_bytes_per_s == pytest.approx(2e8)
    assert model.transfer_s(1_000_000_000) == pytest.approx(5.0)
    model.add_transfer(TransferSample(0, 0.0))  # changes nothing
    assert model.bandwidth_bytes_per_s == pytest.approx(2e8)
    assert model.num_samples["transfer"] == 3


def test_bad_numbers_are_refused_by_name() -> None:
    model = CostModel()
    assert_invalid(lambda: model.prefill_s(-1, 0), "num_new_tokens must be >= 0, got -1")
    assert_invalid(lambda: model.decode_step_s(1, -5), "num_context_tokens must be >= 0, got -5")
    assert_invalid(lambda: model.transfer_s(-1), "num_bytes must be >= 0, got -1")
    assert_invalid(lambda: model.add_prefill(PrefillSample(0, 0, 0.1)),
                   "num_new_tokens must be >= 1, got 0")
    assert_invalid(lambda: model.add_decode(DecodeSample(0, 0, 0.1)),
                   "batch_size must be >= 1, got 0")
    assert_invalid(lambda: model.add_transfer(TransferSample(10, float("nan"))),
                   "seconds must be finite and >= 0, got nan")
    assert_invalid(lambda: CostDefaults(decode_fixed_s=-1.0),
                   "decode_fixed_s must be finite and >= 0, got -1.0")
    assert_invalid(lambda: CostDefaults(bandwidth_bytes_per_s=0.0),
                   "bandwidth_bytes_per_s must be > 0, got 0.0")
    assert_invalid(lambda: CostDefaults(window=2), "window must be >= 4, got 2")
    assert model.num_samples == {"prefill": 0, "decode": 0, "transfer": 0, "tbt": 0}


def test_the_tbt_tail_is_the_90th_percentile_ratio_within_bounds() -> None:
    model = CostModel()
    for observed in (0.03, 0.02, 0.05, 0.04, 0.02, 0.03, 0.06):
        model.add_tbt(0.02, observed)
    assert model.tbt_tail == 1.0  # 7 requests: not yet evidence
    model.add_tbt(0.02, 0.03)
    assert model.tbt_tail == pytest.approx(3.0)  # p90 (8th of 8) of 1, 1, 1.5, 1.5, 1.5, 2, 2.5, 3
    for _ in range(12):
        model.add_tbt(0.02, 0.02)
    assert model.tbt_tail == pytest.approx(2.0)  # 18th of 20: 1 x14, 1.5 x3, 2, 2.5, 3
    model.add_tbt(0.0, 0.05)  # nothing predicted: nothing to compare
    assert model.num_samples["tbt"] == 20
    fast, slow = CostModel(), CostModel()
    for _ in range(8):
        fast.add_tbt(0.02, 0.01)
        slow.add_tbt(0.01, 1.0)
    assert (fast.tbt_tail, slow.tbt_tail) == (1.0, 4.0)
    with pytest.raises(InvalidParamsError):
        model.add_tbt(0.02, -1.0)


def test_the_drain_fit_learns_what_queue_and_own_prefill_take() -> None:
    """Prefills that end at 3 s per predicted second of queue ahead and 1.5 s per second of
    their own: the fit finds both, once it has enough of them."""
    fit = DrainFit()
    samples = [(0.0, 0.2), (0.4, 0.2), (1.0, 0.1), (0.2, 0.3), (0.6, 0.2)]
    for queue_s, own_s in samples[:3]:
        fit.add(queue_s, own_s, 3.0 * queue_s + 1.5 * own_s)
    assert fit.coefficients() == (1.0, 1.0)  # 3 prefills: not yet evidence
    for queue_s, own_s in samples[3:]:
        fit.add(queue_s, own_s, 3.0 * queue_s + 1.5 * own_s)
    assert fit.coefficients() == pytest.approx((3.0, 1.5))
    assert fit.num_added == 5


def test_a_drain_fit_without_a_queue_keeps_the_queue_at_the_cost_model() -> None:
    fit = DrainFit()
    for own_s in (0.1, 0.2, 0.3, 0.4):
        fit.add(0.0, own_s, 2.0 * own_s)  # nothing ever queued: the queue factor has no evidence
    assert fit.coefficients() == pytest.approx((1.0, 2.0))
    fit.add(0.0, 0.0, 5.0)  # nothing predicted: nothing to compare
    assert fit.num_added == 4


def test_the_drain_fit_stays_within_bounds() -> None:
    slow, fast = DrainFit(), DrainFit()
    for queue_s in (0.1, 0.2, 0.3, 0.4):
        slow.add(queue_s, 0.1, 100.0 * (queue_s + 0.1))
        fast.add(queue_s, 0.1, 0.0)
    assert slow.coefficients() == (10.0, 10.0)
    assert fast.coefficients() == (0.1, 0.1)
    with pytest.raises(InvalidParamsError):
        slow.add(0.1, 0.1, -1.0)
