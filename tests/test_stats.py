"""bench.stats: medians, small-sample intervals of ratios, and the speedup verdict."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from bench.stats import (
    FASTER,
    MIN_SAMPLES_PER_ARM,
    NO_CHANGE,
    NO_INTERVAL,
    NO_VERDICT,
    SLOWER,
    classify_ratio,
    cover,
    estimate_speedup,
    median,
    ratio_ci,
    speedup_ci,
    stratified_ratio_ci,
    summarize,
)


def _noisy(center: float, n: int, seed: int, rel: float = 0.03) -> np.ndarray:
    return center * (1.0 + rel * np.random.default_rng(seed).standard_normal(n))


def test_known_ratio_is_inside_the_interval_and_one_is_outside():
    a = _noisy(10.0, 30, seed=1)
    b = 1.3 * _noisy(10.0, 30, seed=2)
    point, lo, hi = ratio_ci(a, b)
    assert point == pytest.approx(float(np.median(b) / np.median(a)))
    assert lo <= 1.3 <= hi
    assert lo > 1.0
    assert hi - lo < 0.1  # 3% noise, 30 samples: a tight interval
    assert classify_ratio(lo, hi) == FASTER


def test_identical_arms_are_no_measurable_change():
    a = _noisy(5.0, 20, seed=3)
    point, lo, hi = ratio_ci(a, a.copy())
    assert point == pytest.approx(1.0)
    assert lo < 1.0 < hi
    assert classify_ratio(lo, hi) == NO_CHANGE


def test_same_distribution_different_draws_is_no_measurable_change():
    point, lo, hi = speedup_ci(_noisy(5.0, 25, seed=4), _noisy(5.0, 25, seed=5))
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


def test_interval_is_deterministic_and_a_single_stratum_is_the_plain_interval():
    # the t-interval has no resampling: the same data give the same interval
    a, b = _noisy(1.0, 12, seed=10), _noisy(1.2, 12, seed=11)
    assert ratio_ci(a, b) == ratio_ci(list(a), list(b)) == stratified_ratio_ci([a], [1], [b], [1])


def test_statistic_without_axis_argument_still_works():
    a, b = _noisy(2.0, 10, seed=12), 2.0 * _noisy(2.0, 10, seed=13)

    def mean(x):  # a plain function of one sequence, no axis keyword
        return float(sum(x) / len(x))

    point, lo, hi = ratio_ci(a, b, stat=mean)
    assert point == pytest.approx(float(np.mean(b) / np.mean(a)))
    assert lo <= 2.0 <= hi


def test_stratified_one_stratum_equals_plain_ratio():
    a, b = _noisy(3.0, 10, seed=14), _noisy(4.0, 10, seed=15)
    assert stratified_ratio_ci([a], [1.0], [b], [1.0]) == ratio_ci(a, b)


def test_stratified_hybrid_schedule_weights_each_phase():
    # Baseline: 10 epochs at ~10 s. Arm: 5 dense epochs at ~10 s and 5 sparse at ~5 s -> 100 / 75.
    base = _noisy(10.0, 9, seed=16)
    dense, sparse = _noisy(10.0, 4, seed=17), _noisy(5.0, 4, seed=18)
    point, lo, hi = stratified_ratio_ci([dense, sparse], [5, 5], [base], [10])
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
    # Was [1.0, 1.1] vs [1.0, 1.1]: two samples per arm now give no verdict (below).
    same = [1.0, 1.1, 1.05]
    assert "no measurable change" in estimate_speedup([same], [1], [same], [1], "m").text()


def test_empty_or_nonfinite_arm_is_refused():
    with pytest.raises(ValueError, match="empty"):
        ratio_ci([], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        ratio_ci([1.0, float("nan")], [1.0])


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


# ---------------------------------------------------------------- the t-interval and its calibration


def test_interval_is_welchs_on_log_times():
    a, b = [9.8, 10.3, 10.1], [12.2, 11.7, 12.9]
    point, lo, hi = ratio_ci(a, b)
    assert point == pytest.approx(12.2 / 10.1)  # ratio of medians
    ci = stats.ttest_ind(np.log(b), np.log(a), equal_var=False).confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((float(np.exp(ci.low)), float(np.exp(ci.high))), rel=1e-12)
    # speedup_ci is baseline / arm: the same interval with the arms swapped.
    assert speedup_ci(b, a) == (point, lo, hi)
    lo90, hi90 = ratio_ci(a, b, level=0.90)[1:]
    assert lo < lo90 < hi90 < hi


def test_too_few_samples_give_no_verdict():
    assert MIN_SAMPLES_PER_ARM == 3
    point, lo, hi = ratio_ci([1.0, 1.1], [2.0, 2.1, 2.2])
    assert point == pytest.approx(2.1 / 1.05)
    assert np.isnan(lo) and np.isnan(hi)
    assert classify_ratio(lo, hi) == NO_VERDICT
    s = estimate_speedup([[10.0, 10.1, 9.9]], [1.0], [[5.0, 5.1]], [1.0], "repeats (3 vs 2)")
    assert s.verdict == NO_VERDICT and s.lo_x is None and s.hi_x is None
    assert s.point_x == pytest.approx(10.0 / 5.05)
    assert "too few samples for a verdict" in s.text()
    assert NO_VERDICT.startswith("no interval")  # the report's formatter prints it as '(no CI)'


def test_nonpositive_times_are_refused():
    with pytest.raises(ValueError, match="<= 0"):
        ratio_ci([1.0, 0.0, 1.0], [1.0, 1.0, 1.0])


def test_stratified_interval_reduces_to_the_plain_one():
    a, b = _noisy(3.0, 6, seed=19), _noisy(4.0, 5, seed=20)
    other = _noisy(7.0, 4, seed=21)
    assert stratified_ratio_ci([a], [1.0], [b], [1.0]) == ratio_ci(a, b)
    # A stratum of weight 0 adds nothing to the total, its variance or the degrees of freedom.
    assert stratified_ratio_ci([a, other], [1.0, 0.0], [b], [1.0]) == pytest.approx(ratio_ci(a, b), rel=1e-12)


def _old_percentile_bootstrap(base: np.ndarray, arm: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """The interval bench.stats used before: percentile bootstrap of a ratio of medians, 1000 resamples."""
    sb = np.median(base[rng.integers(0, base.size, (1000, base.size))], axis=1)
    sa = np.median(arm[rng.integers(0, arm.size, (1000, arm.size))], axis=1)
    lo, hi = np.quantile(sb / sa, [0.025, 0.975])
    return float(lo), float(hi)


def _simulate(n: int, ratio: float, method: str = "t", n_sets: int = 400, seed: int = 0) -> tuple[float, float]:
    """Coverage of the true speedup and rate of faster/slower verdicts over lognormal datasets.

    Baseline epochs ~ 10 s x exp(N(0, 0.05^2)), the arm's ~ 10 s / ratio x exp(N(0, 0.08^2)): the true
    speedup (ratio of medians) is `ratio`.
    """
    rng = np.random.default_rng(seed)
    covered = changed = 0
    for _ in range(n_sets):
        base = 10.0 * np.exp(0.05 * rng.standard_normal(n))
        arm = 10.0 / ratio * np.exp(0.08 * rng.standard_normal(n))
        lo, hi = speedup_ci(base, arm)[1:] if method == "t" else _old_percentile_bootstrap(base, arm, rng)
        covered += lo <= ratio <= hi
        changed += classify_ratio(lo, hi) in (FASTER, SLOWER)
    return covered / n_sets, changed / n_sets


@pytest.mark.parametrize("n", [3, 5])
def test_interval_keeps_95_percent_coverage_at_small_n(n):
    coverage, power = _simulate(n, 1.2, seed=n)
    assert coverage >= 0.93
    assert power >= (0.5 if n == 3 else 0.85)  # honest, but not so wide that it never decides
    coverage0, false_change = _simulate(n, 1.0, seed=100 + n)
    assert coverage0 >= 0.93
    assert false_change <= 0.07


def test_the_simulation_catches_the_old_percentile_bootstrap():
    coverage, _ = _simulate(3, 1.2, method="old", seed=3)
    _, false_change = _simulate(3, 1.0, method="old", seed=103)
    assert coverage < 0.93 or false_change > 0.07


def test_hybrid_schedule_interval_keeps_its_coverage():
    # Baseline: 10 epochs at 10 s. Arm: 3 dense epochs at 10 s, 7 sparse at 6 s; 3 samples per phase.
    rng = np.random.default_rng(22)
    true = (10 * 10.0) / (3 * 10.0 + 7 * 6.0)
    covered = 0
    for _ in range(400):
        base = 10.0 * np.exp(0.05 * rng.standard_normal(3))
        dense, sparse = 10.0 * np.exp(0.03 * rng.standard_normal(3)), 6.0 * np.exp(0.1 * rng.standard_normal(3))
        _, lo, hi = stratified_ratio_ci([dense, sparse], [3, 7], [base], [10])
        covered += lo <= true <= hi
    assert covered / 400 >= 0.93


def test_the_point_always_lies_inside_its_interval():
    # a skewed arm (one very slow epoch among fast ones, as on a busy machine): the median ratio is far from
    # the ratio of geometric means the t-interval is centred on; the interval is widened to hold it
    base = [1.0, 1.01, 0.99, 1.02, 0.98]
    arm = [0.80, 0.81, 0.79, 3.5, 4.0]
    point, lo, hi = ratio_ci(arm, base)
    assert point == pytest.approx(1.0 / 0.81)
    assert lo <= point <= hi
    _, glo, ghi = stratified_ratio_ci([arm], [1.0], [base], [1.0], stat=lambda x: float(np.exp(np.log(x).mean())))
    assert hi == pytest.approx(max(ghi, point)) and lo == pytest.approx(min(glo, point))
    assert cover(2.0, 0.5, 1.5) == (0.5, 2.0) and cover(1.0, 0.5, 1.5) == (0.5, 1.5)
    assert cover(None, 0.5, 1.5) == (0.5, 1.5) and cover(2.0, None, None) == (None, None)
    s = estimate_speedup([base], [1.0], [arm], [1.0], "epochs", point_x=3.0)
    assert s.point_x == 3.0 and s.lo_x <= 3.0 <= s.hi_x
