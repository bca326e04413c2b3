"""Interval estimates for reported results: the Student-t interval of a mean, and
percentile-bootstrap intervals of a mean and of a paired difference (for bounded
quantities such as accuracies, whose distribution over seeds or episodes is skewed near 0
and 1, where the t interval can leave [0, 1])."""

from __future__ import annotations

import numpy as np
from scipy import stats


def mean_ci95(values) -> tuple[float, float, float]:
    """Mean and Student-t 95% confidence interval of the mean."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if v.size < 2:
        return m, m, m
    h = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return m, m - h, m + h


def bootstrap_ci(
    values, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of the mean.

    The ``resamples`` means of samples drawn with replacement from ``values`` give the
    interval ``[q_{(1-level)/2}, q_{(1+level)/2}]``; it never leaves the range of the
    data, so an accuracy's interval stays in [0, 1]. ``values`` must be finite (count
    diverged runs as a score first) and non-empty; a single value gives a zero-width
    interval. The seed makes the interval reproducible."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not np.all(np.isfinite(v)):
        raise ValueError("bootstrap_ci needs finite values; score diverged runs first")
    m = float(v.mean())
    if v.size < 2:
        return m, m, m
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(resamples, v.size))
    means = v[idx].mean(axis=1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return m, float(lo), float(hi)


def paired_difference(a, b, level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> dict:
    """The paired difference ``a - b`` of two methods measured on the same units (seeds or
    episodes, in the same order): its mean, percentile-bootstrap interval, the number of
    units and how many favour each side. ``significant`` is true when the interval
    excludes 0."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs equal-length samples, got {a.size} and {b.size}")
    d = a - b
    m, lo, hi = bootstrap_ci(d, level, resamples, seed)
    return {
        "mean": m,
        "ci": [lo, hi],
        "level": level,
        "n": int(d.size),
        "a_better": int(np.sum(d > 0)),
        "b_better": int(np.sum(d < 0)),
        "significant": bool(lo > 0 or hi < 0),
    }
