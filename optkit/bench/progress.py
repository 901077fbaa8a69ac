"""The sweep's progress on stderr: one line per point as it starts, its rows' status (an error's cause, the
row's first line) and an ETA when it ends. Lines, not a redrawn bar, so CI logs read the same."""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, List


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A one-line-per-point progress report with ETA (works in CI logs, unlike a redrawn bar)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self.done, self.started_at, self.point_started = 0, time.time(), 0.0
        self.durations: List[float] = []

    def start(self, label: str) -> None:
        self.point_started = time.time()
        if self.enabled:
            _log(f"[{self.done + 1}/{self.total}] {label} ...")

    def skip(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            _log(f"[{self.done}/{self.total}] skip {label}")

    def finish(self, rows: List[Dict[str, Any]]) -> None:
        """The rows one point process returned (one per measurement window)."""
        self.done += len(rows)
        elapsed = time.time() - self.point_started
        self.durations.extend([elapsed / max(1, len(rows))] * len(rows))
        if not self.enabled:
            return
        remaining = (self.total - self.done) * (sum(self.durations) / len(self.durations))
        for row in rows:
            tps = row.get("tokens_per_s")
            error = (row.get("error") or "").splitlines()[0][:120] if row.get("error") else ""
            result = f"{tps:,.0f} tok/s" if tps else error
            _log(f"    r{row.get('repeat')} {row.get('status')}  {result}")
        _log(f"    ({elapsed:.1f}s, ETA {remaining / 60:.1f} min)")
