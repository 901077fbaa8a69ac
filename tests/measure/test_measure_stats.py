"""Summary statistics against numpy, the median CI against its textbook ranks and its coverage."""

import math
import random

import numpy as np
import pytest

from optkit.measure.stats import bootstrap_ratio_ci, ci_excludes, median_ci_order_stats, summarize


@pytest.mark.parametrize("n", [1, 2, 7, 10, 33, 120])
def test_percentiles_match_numpy_on_seeded_samples(n):
    samples = list(np.random.default_rng(n).lognormal(3.0, 0.3, size=n))
    out = summarize(samples)
    assert out["n"] == n
    assert out["median"] == pytest.approx(np.median(samples), rel=1e-12)
    assert out["mean"] == pytest.approx(np.mean(samples), rel=1e-12)
    for q in (5, 10, 25, 75, 90, 95):
        assert out[f"p{q}"] == pytest.approx(np.percentile(samples, q), rel=1e-12)
    assert out["iqr"] == pytest.approx(np.percentile(samples, 75) - np.percentile(samples, 25), abs=1e-9)
    if n > 1:
        assert out["cv"] == pytest.approx(np.std(samples, ddof=1) / np.mean(samples), rel=1e-9)


@pytest.mark.parametrize("n, low_rank, high_rank", [(6, 1, 6), (10, 2, 9), (20, 6, 15), (50, 18, 33), (100, 40, 61)])
def test_median_ci_uses_the_textbook_order_statistics(n, low_rank, high_rank):
    samples = list(range(1, n + 1))  # the value is its own 1-based rank
    low, high, coverage = median_ci_order_stats(samples)
    assert (low, high) == (low_rank, high_rank)
    assert coverage >= 0.95
    out = summarize(samples)
    assert out["ci95_low"] <= out["median"] <= out["ci95_high"]


def test_median_ci_absent_below_six_samples():
    out = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert out["ci95_low"] is None and out["ci95_high"] is None


def test_median_ci_covers_the_true_median_at_least_95_percent():
    rng = random.Random(1234)
    true_median = math.log(2.0)  # of Exp(1)
    hits = 0
    for _ in range(2000):
        out = summarize([rng.expovariate(1.0) for _ in range(15)])
        hits += out["ci95_low"] <= true_median <= out["ci95_high"]
    assert hits / 2000 >= 0.94  # exact coverage for n=15 is 96.5%


def test_noisy_flag():
    tight = [100.0 + 0.1 * i for i in range(20)]
    assert summarize(tight)["noisy"] is False
    spread = [80.0, 90.0, 100.0, 110.0, 120.0] * 4  # IQR 20 on a median of 100
    assert summarize(spread)["noisy"] is True


def test_summarize_rejects_empty_and_nan():
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError, match="non-finite"):
        summarize([1.0, float("nan")])


def test_bootstrap_ratio_ci_brackets_the_true_ratio_and_is_reproducible():
    rng = np.random.default_rng(11)
    baseline = list(rng.normal(200.0, 4.0, size=60))
    candidate = list(rng.normal(100.0, 2.0, size=60))
    out = bootstrap_ratio_ci(baseline, candidate, n_resamples=1000, seed=7)
    assert out["ratio"] == pytest.approx(np.median(baseline) / np.median(candidate))
    assert out["ci_low"] <= out["ratio"] <= out["ci_high"]
    assert 1.9 < out["ci_low"] and out["ci_high"] < 2.1
    assert bootstrap_ratio_ci(baseline, candidate, n_resamples=1000, seed=7) == out
    assert ci_excludes(out["ci_low"], out["ci_high"], 1.0) is True
    same = bootstrap_ratio_ci(baseline, baseline[::-1], n_resamples=500)
    assert ci_excludes(same["ci_low"], same["ci_high"], 1.0) is False
    with pytest.raises(ValueError):
        bootstrap_ratio_ci([1.0], [1.0, 2.0])
