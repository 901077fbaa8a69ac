"""Unions of time intervals: the busy time of a stream, the host ranges a device event falls in.

Torch-free: traces are read and reports are rendered without torch.
"""
from __future__ import annotations

import bisect
from typing import Iterable, List, Tuple


def merge_intervals(intervals: Iterable[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """Sorted, disjoint union of (start, end) intervals (touching ones are joined)."""
    merged: List[List[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def busy_ms(intervals: Iterable[Tuple[float, float]]) -> float:
    """Length of the union of (start_us, end_us) intervals, in ms: on one stream, the summed durations."""
    return sum(end - start for start, end in merge_intervals(intervals)) / 1e3


class Intervals:
    """Sorted, possibly nested intervals; ``contains(t)``: t lies in at least one."""

    def __init__(self, intervals: Iterable[Tuple[float, float]]):
        merged = merge_intervals(intervals)
        self._starts = [m[0] for m in merged]
        self._ends = [m[1] for m in merged]

    def contains(self, t: float) -> bool:
        i = bisect.bisect_right(self._starts, t) - 1
        return i >= 0 and t <= self._ends[i]
