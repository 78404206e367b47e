"""bench.stats: medians, bootstrap intervals of ratios, and the speedup verdict."""

from __future__ import annotations

import numpy as np
import pytest

from bench.stats import (
    FASTER,
    NO_CHANGE,
    NO_INTERVAL,
    SLOWER,
    bootstrap_ratio_ci,
    bootstrap_stratified_ratio_ci,
    classify_ratio,
    estimate_speedup,
    median,
    speedup_ci,
    summarize,
)


def _noisy(center: float, n: int, seed: int, rel: float = 0.03) -> np.ndarray:
    return center * (1.0 + rel * np.random.default_rng(seed).standard_normal(n))


def test_known_ratio_is_inside_the_interval_and_one_is_outside():
    a = _noisy(10.0, 30, seed=1)
    b = 1.3 * _noisy(10.0, 30, seed=2)
    point, lo, hi = bootstrap_ratio_ci(a, b, n_boot=2000, seed=0)
    assert point == pytest.approx(float(np.median(b) / np.median(a)))
    assert lo <= 1.3 <= hi
    assert lo > 1.0
    assert hi - lo < 0.1  # 3% noise, 30 samples: a tight interval
    assert classify_ratio(lo, hi) == FASTER


def test_identical_arms_are_no_measurable_change():
    a = _noisy(5.0, 20, seed=3)
    point, lo, hi = bootstrap_ratio_ci(a, a.copy(), n_boot=2000, seed=0)
    assert point == pytest.approx(1.0)
    assert lo < 1.0 < hi
    assert classify_ratio(lo, hi) == NO_CHANGE


def test_same_distribution_different_draws_is_no_measurable_change():
    point, lo, hi = speedup_ci(_noisy(5.0, 25, seed=4), _noisy(5.0, 25, seed=5), seed=7)
    assert lo <= 1.0 <= hi
    assert classify_ratio(lo, hi) == NO_CHANGE


def test_slower_arm_is_classified_slower():
    base = _noisy(10.0, 20, seed=6)
    arm = 1.5 * _noisy(10.0, 20, seed=7)
    point, lo, hi = speedup_ci(base, arm)
    assert point == pytest.approx(float(np.median(base) / np.median(arm)))
    assert hi < 1.0
    assert classify_ratio(lo, hi) == SLOWER


def test_speedup_ci_is_baseline_over_arm():
    base = _noisy(20.0, 15, seed=8)
    arm = _noisy(10.0, 15, seed=9)
    point, lo, hi = speedup_ci(base, arm)
    assert point == pytest.approx(float(np.median(base) / np.median(arm)))
    assert lo <= 2.0 <= hi


def test_seeded_bootstrap_is_reproducible():
    a, b = _noisy(1.0, 12, seed=10), _noisy(1.2, 12, seed=11)
    assert bootstrap_ratio_ci(a, b, seed=3) == bootstrap_ratio_ci(a, b, seed=3)
    assert bootstrap_ratio_ci(a, b, seed=3) != bootstrap_ratio_ci(a, b, seed=4)


def test_statistic_without_axis_argument_still_works():
    a, b = _noisy(2.0, 10, seed=12), 2.0 * _noisy(2.0, 10, seed=13)

    def mean(x):  # no axis keyword: the bootstrap falls back to a loop
        return float(sum(x) / len(x))

    point, lo, hi = bootstrap_ratio_ci(a, b, n_boot=300, stat=mean)
    assert point == pytest.approx(float(np.mean(b) / np.mean(a)))
    assert lo <= 2.0 <= hi


def test_stratified_one_stratum_equals_plain_ratio():
    a, b = _noisy(3.0, 10, seed=14), _noisy(4.0, 10, seed=15)
    assert bootstrap_stratified_ratio_ci([a], [1.0], [b], [1.0], seed=2)[0] == pytest.approx(
        bootstrap_ratio_ci(a, b, seed=2)[0]
    )


def test_stratified_hybrid_schedule_weights_each_phase():
    # Baseline: 10 epochs at ~10 s. Arm: 5 dense epochs at ~10 s and 5 sparse at ~5 s -> 100 / 75.
    base = _noisy(10.0, 9, seed=16)
    dense, sparse = _noisy(10.0, 4, seed=17), _noisy(5.0, 4, seed=18)
    point, lo, hi = bootstrap_stratified_ratio_ci([dense, sparse], [5, 5], [base], [10], seed=0)
    expected = 10 * float(np.median(base)) / (5 * float(np.median(dense)) + 5 * float(np.median(sparse)))
    assert point == pytest.approx(expected)
    assert lo <= 100 / 75 <= hi


def test_estimate_speedup_needs_two_samples_per_arm_for_an_interval():
    s = estimate_speedup([[10.0]], [1.0], [[5.0]], [1.0], "epochs (1 vs 1)")
    assert s.point_x == pytest.approx(2.0)
    assert s.lo_x is None and s.hi_x is None
    assert s.verdict == NO_INTERVAL
    s2 = estimate_speedup([[10.0, 10.2, 9.9]], [1.0], [[5.0, 5.1, 4.9]], [1.0], "epochs (3 vs 3)")
    assert s2.verdict == FASTER
    assert s2.lo_x <= s2.point_x <= s2.hi_x
    assert s2.to_dict("speedup")["speedup_x"] == s2.point_x
    assert "no measurable change" in estimate_speedup([[1.0, 1.1]], [1], [[1.0, 1.1]], [1], "m").text()


def test_empty_or_nonfinite_arm_is_refused():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ratio_ci([], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ratio_ci([1.0, float("nan")], [1.0])


def test_summarize_and_median():
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["n"] == 5
    assert s["p50"] == 3.0
    assert s["p90"] == pytest.approx(float(np.percentile([1, 2, 3, 4, 100], 90)))
    assert s["mean"] == pytest.approx(22.0)
    assert s["min"] == 1.0 and s["max"] == 100.0
    assert summarize([])["p50"] is None
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert list(median(np.array([[1.0, 2.0, 9.0], [4.0, 5.0, 6.0]]), axis=1)) == [2.0, 5.0]
    assert classify_ratio(None, None) == NO_INTERVAL
