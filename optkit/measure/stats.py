"""Summaries of per-step times that say how much to trust them.

``summarize`` reports the median with a distribution-free 95% confidence interval from order
statistics (the binomial interval of Hahn & Meeker: no seed, no resampling, exact coverage
>= 95%; below 6 samples no such interval exists and the bounds are None). Percentiles use linear
interpolation between order statistics (numpy's default, "type 7"). A sample set is ``noisy``
when IQR / median > 0.10.

``bootstrap_ratio_ci`` gives the CI of a ratio of medians (e.g. speedup = baseline / candidate)
by percentile bootstrap with a fixed seed, resampling the two sides independently.

For report and regress, samples come in *groups*: one array of step times per measurement window
(bench.repeats). Steps of one window share the window's conditions (clocks, neighbours, allocator
state), so resampling only steps would understate the spread between windows. ``median_ci`` and
``ratio_ci`` therefore bootstrap on two levels: draw windows with replacement, then steps with
replacement inside each drawn window, and take the median of the pooled draw (with one window it is
the ordinary percentile bootstrap). ``mann_whitney_p`` is the two-sided rank test regress uses
(normal approximation, numpy only, no scipy).
"""

from __future__ import annotations

import math
import random
import statistics
from fractions import Fraction
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

NOISY_IQR_OVER_MEDIAN = 0.10
_PERCENTILES = (5, 10, 25, 75, 90, 95)


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) of already sorted samples, linear interpolation (numpy default)."""
    if not sorted_samples:
        raise ValueError("percentile of no samples")
    pos = (len(sorted_samples) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_samples) - 1)
    frac = pos - lo
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * frac


def median_ci_order_stats(sorted_samples: Sequence[float], confidence: float = 0.95):
    """(low, high, coverage) of the median from order statistics, or (None, None, None) if n is
    too small for ``confidence``. low = x_(k), high = x_(n+1-k) (1-based) with the largest k such
    that P(Binomial(n, 1/2) <= k-1) <= (1-confidence)/2; exact integer arithmetic."""
    n = len(sorted_samples)
    alpha_half = Fraction((1.0 - confidence) / 2.0).limit_denominator(10**6)
    total = 2**n  # ints all the way: 0.5**n underflows a float beyond n ~ 1000
    cdf_count, term, k = 0, 1, 0  # term = C(n, k); cdf_count = sum_{i<k} C(n, i)
    while k < n // 2 and (cdf_count + term) * alpha_half.denominator <= alpha_half.numerator * total:
        cdf_count += term
        k += 1
        term = term * (n - k + 1) // k
    if k == 0:
        return None, None, None
    coverage = float(1 - 2 * Fraction(cdf_count, total))
    return sorted_samples[k - 1], sorted_samples[n - k], coverage


def summarize(samples_ms: Sequence[float]) -> dict:
    """median, mean, p5..p95, iqr, n, cv, stdev, min, max, ci95 of the median, noisy flag."""
    values = sorted(float(x) for x in samples_ms)
    if not values:
        raise ValueError("summarize() needs at least one sample")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("summarize() got a non-finite sample (nan/inf); drop or fix the failed step")
    n = len(values)
    median = percentile(values, 50)
    mean = statistics.fmean(values)
    stdev = statistics.stdev(values) if n > 1 else 0.0
    out = {"n": n, "median": median, "mean": mean, "stdev": stdev, "min": values[0], "max": values[-1]}
    for q in _PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    out["iqr"] = out["p75"] - out["p25"]
    out["cv"] = stdev / mean if mean else None
    low, high, coverage = median_ci_order_stats(values)
    out.update(
        ci95_low=low,
        ci95_high=high,
        ci95_coverage=coverage,
        ci95_method="order statistics (binomial), distribution-free",
    )
    out["iqr_over_median"] = out["iqr"] / median if median else None
    out["noisy"] = out["iqr_over_median"] is not None and out["iqr_over_median"] > NOISY_IQR_OVER_MEDIAN
    return out


def bootstrap_ratio_ci(
    a_samples: Sequence[float],
    b_samples: Sequence[float],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    statistic: Callable[[Sequence[float]], float] = statistics.median,
) -> dict:
    """statistic(a) / statistic(b) and its percentile-bootstrap CI.

    For a time speedup pass the baseline's step times as ``a`` and the candidate's as ``b``
    (ratio > 1: candidate faster); for a throughput ratio pass them the other way round.
    """
    a, b = [float(x) for x in a_samples], [float(x) for x in b_samples]
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"bootstrap_ratio_ci needs >= 2 samples per side, got {len(a)} and {len(b)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    denominator = statistic(b)
    if denominator == 0:
        raise ValueError("statistic(b) is 0: the ratio is undefined")
    rng = random.Random(seed)
    ratios = []
    for _ in range(n_resamples):
        ra = statistic(rng.choices(a, k=len(a)))
        rb = statistic(rng.choices(b, k=len(b)))
        if rb != 0:
            ratios.append(ra / rb)
    ratios.sort()
    tail = (1.0 - confidence) / 2.0 * 100.0
    return {
        "ratio": statistic(a) / denominator,
        "ci_low": percentile(ratios, tail),
        "ci_high": percentile(ratios, 100.0 - tail),
        "confidence": confidence,
        "n_resamples": n_resamples,
        "seed": seed,
        "n_a": len(a),
        "n_b": len(b),
        "method": "percentile bootstrap, a and b resampled independently",
    }


def ci_excludes(ci_low: Optional[float], ci_high: Optional[float], value: float = 1.0) -> Optional[bool]:
    """True when [ci_low, ci_high] lies entirely above or below ``value``; None without a CI."""
    if ci_low is None or ci_high is None:
        return None
    return ci_low > value or ci_high < value


# --------------------------------------------------------------------------- grouped samples (report, regress)

Groups = Sequence[Sequence[float]]
N_BOOT = 2000  # percentile-CI endpoints move by < 1% of the CI width beyond ~2000 draws


def _clean_groups(groups: Groups) -> list:
    arrays = [np.asarray(g, dtype=np.float64) for g in groups if g is not None]
    arrays = [a[np.isfinite(a)] for a in arrays]
    return [a for a in arrays if a.size]


def pooled_median(groups: Groups) -> Optional[float]:
    arrays = _clean_groups(groups)
    return float(np.median(np.concatenate(arrays))) if arrays else None


def _bootstrap_medians(arrays: list, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """n_boot medians of two-level resamples (windows, then steps within each window)."""
    lengths = np.array([a.size for a in arrays])
    padded = np.full((len(arrays), lengths.max()), np.nan)
    for i, a in enumerate(arrays):
        padded[i, : a.size] = a
    picked = rng.integers(len(arrays), size=(n_boot, len(arrays)))  # (B, k) window ids
    picked_len = lengths[picked][..., None]  # (B, k, 1)
    steps = (rng.random((n_boot, len(arrays), lengths.max())) * picked_len).astype(np.int64)
    draws = padded[picked[..., None], steps]  # (B, k, n_max)
    # A short window contributes only its own length of draws: mask the padding positions.
    draws[np.arange(lengths.max())[None, None, :] >= picked_len] = np.nan
    return np.nanmedian(draws.reshape(n_boot, -1), axis=1)


def median_ci(
    groups: Groups, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0
) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """(median, low, high) of the pooled samples; (None, None, None) without samples."""
    arrays = _clean_groups(groups)
    if not arrays:
        return None, None, None
    meds = _bootstrap_medians(arrays, n_boot, np.random.default_rng(seed))
    tail = (1.0 - level) / 2.0
    return pooled_median(arrays), float(np.quantile(meds, tail)), float(np.quantile(meds, 1 - tail))


def ratio_ci(
    num: Groups, den: Groups, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0
) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """median(num) / median(den) with a bootstrap CI; the two sides are resampled independently."""
    a, b = _clean_groups(num), _clean_groups(den)
    if not a or not b:
        return None, None, None
    rng = np.random.default_rng(seed)
    ratios = _bootstrap_medians(a, n_boot, rng) / _bootstrap_medians(b, n_boot, rng)
    tail = (1.0 - level) / 2.0
    return (pooled_median(a) / pooled_median(b), float(np.quantile(ratios, tail)), float(np.quantile(ratios, 1 - tail)))


def _average_ranks(values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """1-based ranks with ties sharing their mean rank, and the size of every tie block."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    sizes = np.diff(np.r_[starts, values.size])
    mean_rank = starts + (sizes + 1) / 2.0  # block i spans ranks starts+1 .. starts+sizes
    ranks = np.empty(values.size)
    ranks[order] = np.repeat(mean_rank, sizes)
    return ranks, sizes


def mann_whitney_p(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Two-sided Mann-Whitney U p-value (normal approximation, tie and continuity corrected).

    The normal approximation is within a few percent of the exact p for n >= 6 per side, the
    smallest sample regress accepts; None when either side is empty or every value ties.
    """
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    n1, n2 = x.size, y.size
    if n1 == 0 or n2 == 0:
        return None
    ranks, ties = _average_ranks(np.concatenate([x, y]))
    u1 = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    tie_term = float((ties**3 - ties).sum()) / (n * (n - 1))
    var_u = n1 * n2 / 12.0 * ((n + 1) - tie_term)
    if var_u <= 0:
        return None
    z = (abs(u1 - n1 * n2 / 2.0) - 0.5) / math.sqrt(var_u)
    return float(min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2.0))))
