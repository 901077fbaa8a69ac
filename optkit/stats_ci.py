"""Confidence intervals and a rank test for report and regress (numpy only, no scipy).

A stand-in until optkit/measure/stats.py lands: then one of the two should serve both, and this
file should shrink to imports. Kept tiny on purpose.

Samples come in *groups*: one array of step times per measurement window (bench.repeats). Steps of
one window share the window's conditions (clocks, neighbours, allocator state), so resampling
only steps would understate the spread between windows. The bootstrap is therefore two-level:
draw windows with replacement, then steps with replacement inside each drawn window, and take
the median of the pooled draw. With one window it is the ordinary percentile bootstrap.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

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


def median_ci(groups: Groups, level: float = 0.95, n_boot: int = N_BOOT,
              seed: int = 0) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """(median, low, high) of the pooled samples; (None, None, None) without samples."""
    arrays = _clean_groups(groups)
    if not arrays:
        return None, None, None
    meds = _bootstrap_medians(arrays, n_boot, np.random.default_rng(seed))
    tail = (1.0 - level) / 2.0
    return pooled_median(arrays), float(np.quantile(meds, tail)), float(np.quantile(meds, 1 - tail))


def ratio_ci(num: Groups, den: Groups, level: float = 0.95, n_boot: int = N_BOOT,
             seed: int = 0) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """median(num) / median(den) with a bootstrap CI; the two sides are resampled independently."""
    a, b = _clean_groups(num), _clean_groups(den)
    if not a or not b:
        return None, None, None
    rng = np.random.default_rng(seed)
    ratios = _bootstrap_medians(a, n_boot, rng) / _bootstrap_medians(b, n_boot, rng)
    tail = (1.0 - level) / 2.0
    return (pooled_median(a) / pooled_median(b),
            float(np.quantile(ratios, tail)), float(np.quantile(ratios, 1 - tail)))


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
    tie_term = float((ties ** 3 - ties).sum()) / (n * (n - 1))
    var_u = n1 * n2 / 12.0 * ((n + 1) - tie_term)
    if var_u <= 0:
        return None
    z = (abs(u1 - n1 * n2 / 2.0) - 0.5) / math.sqrt(var_u)
    return float(min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2.0))))
