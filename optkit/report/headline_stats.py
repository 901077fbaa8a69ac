"""Confidence intervals over processes: the spread a user sees between one run of a training job and the next.

Steps of one measurement window share its conditions (clocks, allocator state, autotuning choices, a noisy
neighbour), and so do the windows of one process: resampling them says how well one process was measured,
not how much the next process will differ. Here the unit is the process:
- a process's figure is its tokens/s: tokens per step over the median, across its windows, of each window's
  median step time (rows of one process share ``pid`` within a run);
- an opt-set's tokens/s is the geometric mean over its processes, with a Student t interval on log tokens/s
  (n - 1 degrees of freedom: with 3 processes the interval is honest and wide);
- a ratio of two opt-sets is exp of the difference of their mean log tokens/s, with a Welch interval (the two
  sides' variances are not assumed equal; Welch-Satterthwaite degrees of freedom).
With one process there is no interval (None). Everything here is plain math (the t distribution through the
regularized incomplete beta function); no scipy at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import median
from typing import Any, Dict, List, Optional, Sequence, Tuple

Interval = Tuple[Optional[float], Optional[float], Optional[float]]  # (estimate, low, high)


@dataclass
class ProcessFigure:
    """One process's measurement of a point."""

    key: Tuple[Any, Any]  # (run_id, pid)
    windows: int
    tokens_per_s: float


def process_figures(rows: Sequence[Dict[str, Any]]) -> List[ProcessFigure]:
    """One figure per process among the ok rows of one point (rows without a pid count as one process each)."""
    groups: Dict[Tuple[Any, Any], List[Dict[str, Any]]] = {}
    for i, row in enumerate(rows):
        if row.get("status") != "ok":
            continue
        key = (row.get("run_id"), row.get("pid") if row.get("pid") is not None else f"row{i}")
        groups.setdefault(key, []).append(row)
    figures = []
    for key, group in groups.items():
        steps = [_window_step_ms(r) for r in group]
        steps = [s for s in steps if s]
        tokens = [r["tokens_per_step"] for r in group if r.get("tokens_per_step")]
        if steps and tokens:
            figures.append(ProcessFigure(key, len(group), median(tokens) * 1e3 / median(steps)))
    return figures


def _window_step_ms(row: Dict[str, Any]) -> Optional[float]:
    times = [t for t in row.get("step_times_ms") or [] if isinstance(t, (int, float)) and math.isfinite(t)]
    return median(times) if times else row.get("step_ms")


# --------------------------------------------------------------------------- Student t


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (bisection on the cdf)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return 0.5 * (low + high)


# --------------------------------------------------------------------------- intervals


def _log_stats(values: Sequence[float]) -> Tuple[int, float, float]:
    logs = [math.log(v) for v in values]
    n = len(logs)
    mean = sum(logs) / n
    var = sum((x - mean) ** 2 for x in logs) / (n - 1) if n > 1 else 0.0
    return n, mean, var


def geometric_mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """(geometric mean, low, high): a t interval on log values; no interval below 2 values."""
    values = [v for v in values if v and v > 0]
    if not values:
        return None, None, None
    n, mean, var = _log_stats(values)
    if n < 2:
        return math.exp(mean), None, None
    half = t_quantile(0.5 + level / 2.0, n - 1) * math.sqrt(var / n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def ratio_ci(num: Sequence[float], den: Sequence[float], level: float = 0.95) -> Interval:
    """(ratio of geometric means, low, high) of two independent samples: Welch on log values."""
    num = [v for v in num if v and v > 0]
    den = [v for v in den if v and v > 0]
    if not num or not den:
        return None, None, None
    n1, m1, v1 = _log_stats(num)
    n2, m2, v2 = _log_stats(den)
    ratio = math.exp(m1 - m2)
    if n1 < 2 or n2 < 2:
        return ratio, None, None
    s1, s2 = v1 / n1, v2 / n2
    se = math.sqrt(s1 + s2)
    if se == 0.0:
        return ratio, ratio, ratio
    df = (s1 + s2) ** 2 / (s1**2 / (n1 - 1) + s2**2 / (n2 - 1))
    half = t_quantile(0.5 + level / 2.0, df) * se
    return ratio, math.exp(m1 - m2 - half), math.exp(m1 - m2 + half)
