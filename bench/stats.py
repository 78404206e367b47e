"""Robust summaries and bootstrap intervals for timings.

Speedups are ratios of medians; their spread comes from a seeded percentile
bootstrap that resamples each arm independently (repeats when both arms have
several, otherwise the non-warm-up epochs). An interval that contains 1.0 is
"no measurable change", never a win.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

NO_CHANGE = "no measurable change"
FASTER = "faster"
SLOWER = "slower"
NO_INTERVAL = "no interval (fewer than 2 samples per arm)"


def median(x: Any, axis: int | None = None) -> Any:
    """Median (numpy's), usable as a vectorised bootstrap statistic along `axis`."""
    return np.median(np.asarray(x, dtype=float), axis=axis)


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """p50, p90, mean, std (sample), min, max and n of `values`; None entries when empty."""
    x = np.asarray([float(v) for v in values], dtype=float)
    if x.size == 0:
        return {"n": 0, "p50": None, "p90": None, "mean": None, "std": None, "min": None, "max": None}
    return {
        "n": int(x.size),
        "p50": float(np.median(x)),
        "p90": float(np.percentile(x, 90)),
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
    }


def _vectorised(stat: Callable[..., Any], samples: np.ndarray) -> np.ndarray:
    """stat over each row of a (n_boot, n) array; falls back to a loop for statistics without `axis`."""
    try:
        out = np.asarray(stat(samples, axis=1), dtype=float)
        if out.shape == (samples.shape[0],):
            return out
    except TypeError:
        pass
    return np.asarray([float(stat(row)) for row in samples], dtype=float)


def _check(name: str, x: Sequence[float]) -> np.ndarray:
    arr = np.asarray([float(v) for v in x], dtype=float)
    if arr.size == 0:
        raise ValueError(f"bootstrap arm '{name}' is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"bootstrap arm '{name}' holds non-finite values")
    return arr


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> Any:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(num, dtype=float) / np.asarray(den, dtype=float)


def bootstrap_ratio_ci(
    a: Sequence[float],
    b: Sequence[float],
    n_boot: int = 2000,
    seed: int = 0,
    stat: Callable[..., Any] = median,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Ratio stat(b) / stat(a) with a percentile bootstrap interval: (point, lo, hi).

    Each arm is resampled with replacement on its own (the arms are independent
    runs), `n_boot` times with a seeded generator, so the same inputs always
    give the same interval. For a speedup pass the optimized arm's times as `a`
    and the baseline's as `b` (or use `speedup_ci`).
    """
    xa, xb = _check("a", a), _check("b", b)
    point = float(_ratio(stat(xb), stat(xa)))
    rng = np.random.default_rng(seed)
    sa = xa[rng.integers(0, xa.size, size=(n_boot, xa.size))]
    sb = xb[rng.integers(0, xb.size, size=(n_boot, xb.size))]
    ratios = _ratio(_vectorised(stat, sb), _vectorised(stat, sa))
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(ratios, [alpha, 1.0 - alpha])
    return point, float(lo), float(hi)


def bootstrap_stratified_ratio_ci(
    a: Sequence[Sequence[float]],
    a_weights: Sequence[float],
    b: Sequence[Sequence[float]],
    b_weights: Sequence[float],
    n_boot: int = 2000,
    seed: int = 0,
    stat: Callable[..., Any] = median,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Ratio of weighted sums of per-stratum statistics, T(b) / T(a), T(x) = sum_k w_k * stat(x_k).

    Used for a hybrid schedule whose dense and sparse epochs take different
    times: the training time estimate is (dense epochs x median dense epoch
    time) + (sparse epochs x median sparse epoch time), and each phase's epochs
    are resampled only among themselves. With one stratum and weight 1 this is
    `bootstrap_ratio_ci`.
    """
    if len(a) != len(a_weights) or len(b) != len(b_weights):
        raise ValueError("each stratum needs one weight")
    xa = [_check(f"a[{i}]", s) for i, s in enumerate(a)]
    xb = [_check(f"b[{i}]", s) for i, s in enumerate(b)]
    rng = np.random.default_rng(seed)

    def total(strata: list[np.ndarray], weights: Sequence[float]) -> tuple[float, np.ndarray]:
        point = sum(float(w) * float(stat(s)) for s, w in zip(strata, weights, strict=True))
        boots = np.zeros(n_boot)
        for s, w in zip(strata, weights, strict=True):
            boots += float(w) * _vectorised(stat, s[rng.integers(0, s.size, size=(n_boot, s.size))])
        return point, boots

    pa, ba = total(xa, a_weights)
    pb, bb = total(xb, b_weights)
    ratios = _ratio(bb, ba)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(ratios, [alpha, 1.0 - alpha])
    return float(_ratio(pb, pa)), float(lo), float(hi)


def speedup_ci(
    baseline: Sequence[float], arm: Sequence[float], n_boot: int = 2000, seed: int = 0,
    stat: Callable[..., Any] = median,
) -> tuple[float, float, float]:
    """Speedup stat(baseline) / stat(arm) of times, with its bootstrap interval: (point, lo, hi)."""
    return bootstrap_ratio_ci(arm, baseline, n_boot=n_boot, seed=seed, stat=stat)


def classify_ratio(lo: float | None, hi: float | None) -> str:
    """'faster' when the whole interval is above 1, 'slower' when below, else 'no measurable change'."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return NO_INTERVAL
    if lo > 1.0:
        return FASTER
    if hi < 1.0:
        return SLOWER
    return NO_CHANGE


@dataclass
class Speedup:
    """A speedup with its interval, how the interval was made, and the verdict."""

    point_x: float | None
    lo_x: float | None
    hi_x: float | None
    verdict: str
    method: str
    """'repeats (3 vs 3)', 'epochs (9 vs 9)' or why there is no interval."""

    def to_dict(self, prefix: str = "speedup") -> dict[str, Any]:
        """Flat dict: `<prefix>_x`, `<prefix>_lo_x`, `<prefix>_hi_x`, `<prefix>_verdict`, `<prefix>_ci_method`."""
        d = asdict(self)
        return {
            f"{prefix}_x": d["point_x"],
            f"{prefix}_lo_x": d["lo_x"],
            f"{prefix}_hi_x": d["hi_x"],
            f"{prefix}_verdict": d["verdict"],
            f"{prefix}_ci_method": d["method"],
        }

    def text(self) -> str:
        """'1.23x [1.10, 1.35] faster', or 'no measurable change' spelled out when the interval spans 1."""
        if self.point_x is None:
            return "n/a"
        s = f"{self.point_x:.2f}x"
        if self.lo_x is not None and self.hi_x is not None:
            s += f" [{self.lo_x:.2f}, {self.hi_x:.2f}]"
        if self.verdict == NO_CHANGE:
            s += " (no measurable change)"
        elif self.verdict == NO_INTERVAL:
            s += " (no interval)"
        return s


def estimate_speedup(
    baseline_strata: Sequence[Sequence[float]],
    baseline_weights: Sequence[float],
    arm_strata: Sequence[Sequence[float]],
    arm_weights: Sequence[float],
    method: str,
    point_x: float | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> Speedup:
    """Speedup T(baseline) / T(arm) of stratified time samples, classified by its bootstrap interval.

    `point_x` overrides the point estimate (the report passes the ratio of the
    values it displays); an arm with fewer than 2 samples in a stratum gets no
    interval.
    """
    nonempty = all(len(s) > 0 for s in [*baseline_strata, *arm_strata])
    if not nonempty or not baseline_strata or not arm_strata:
        return Speedup(point_x, None, None, NO_INTERVAL, f"{method}: no samples")
    point, lo, hi = bootstrap_stratified_ratio_ci(
        arm_strata, arm_weights, baseline_strata, baseline_weights, n_boot=n_boot, seed=seed
    )
    if point_x is not None:
        point = point_x
    if min(len(s) for s in [*baseline_strata, *arm_strata]) < 2:
        return Speedup(point, None, None, NO_INTERVAL, method)
    return Speedup(point, lo, hi, classify_ratio(lo, hi), method)
