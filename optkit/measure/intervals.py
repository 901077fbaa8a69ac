"""Unions of time intervals: the busy time of a stream, the host ranges a device event falls in, the
part of one stream's busy time another stream was busy too.

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


def clip_intervals(intervals: Iterable[Tuple[float, float]], start: float, end: float) -> List[Tuple[float, float]]:
    """The parts of ``intervals`` inside [start, end]; intervals wholly outside are dropped."""
    clipped = ((max(s, start), min(e, end)) for s, e in intervals)
    return [(s, e) for s, e in clipped if e > s]


def overlap_ms(intervals: Iterable[Tuple[float, float]], others: Iterable[Tuple[float, float]]) -> float:
    """Length of the intersection of two unions of (start_us, end_us) intervals, in ms: e.g. the part of a
    copy stream's busy time during which some compute kernel ran too."""
    a, b = merge_intervals(intervals), merge_intervals(others)
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total / 1e3
