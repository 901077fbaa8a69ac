"""Reports, step 1: result runs -> points. A run is one results/<gpu>/<suite>/<run_id> directory
(results.jsonl + env.json); a point is every row of one point key (several with bench.repeats > 1 or
when runs are merged). Pure functions of the result files: no GPU, no torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any, Dict, List, Optional, Sequence

from optkit.results.rows import read_run


class ReportInputError(ValueError):
    """Input that cannot be reported on; the message says what to pass instead."""


@dataclass
class Run:
    path: Path
    env: Dict[str, Any]
    rows: List[Dict[str, Any]]
    gpu_slug: str
    suite: str
    run_id: str

    def value(self, *keys: str) -> Any:
        """First of ``keys`` set in env.json, else in a row (env.json names differ: driver_version)."""
        for key in keys:
            if self.env.get(key) is not None:
                return self.env[key]
        for key in keys:
            for row in self.rows:
                if row.get(key) is not None:
                    return row[key]
        return None


def load_run(run_dir) -> Run:
    path = Path(run_dir)
    if not (path / "results.jsonl").is_file():
        below = sorted(str(p.parent) for p in path.glob("**/results.jsonl"))[:8] if path.is_dir() else []
        hint = f"; run directories below it: {', '.join(below)}" if below else \
            "; pass a run directory, results/<gpu>/<suite>/<run_id>, that holds results.jsonl"
        raise ReportInputError(f"{path}: no results.jsonl{hint}")
    env, rows = read_run(path)
    if not rows:
        raise ReportInputError(f"{path}/results.jsonl holds no rows: did the run write any point?")
    rows = [{**row, "_run_dir": str(path)} for row in rows]  # trace links are relative to the run
    run = Run(path, env, rows, "", "", "")
    run.gpu_slug = run.value("gpu_slug") or path.parent.parent.name
    run.suite = run.value("suite") or path.parent.name
    run.run_id = run.value("run_id") or path.name
    return run


def finished_at(run: Run) -> str:
    """When the run wrote its last row (ISO time; "" without timestamps)."""
    return max((str(r.get("timestamp") or "") for r in run.rows), default="")


def newest_of(runs: Sequence[Run]) -> Run:
    """The run whose last row was written last (ties: the last run id in natural order)."""
    return max(runs, key=lambda r: (finished_at(r), natural_key(r.run_id)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m optkit.results.runs RUN_DIR...``: print the newest of the runs (CI picks its baseline so)."""
    import sys

    dirs = list(sys.argv[1:] if argv is None else argv)
    if dirs:
        print(newest_of([load_run(d) for d in dirs]).path)
    return 0


@dataclass
class Point:
    """Every row of one point: several with bench.repeats > 1 or when runs are merged."""

    key: str
    rows: List[Dict[str, Any]]

    @property
    def ok(self) -> List[Dict[str, Any]]:
        return [r for r in self.rows if r.get("status") == "ok"]

    @property
    def head(self) -> Dict[str, Any]:
        return (self.ok or self.rows)[0]

    @property
    def status(self) -> str:
        return "ok" if self.ok else str(self.head.get("status"))

    @property
    def kind(self) -> str:
        return "kernel" if self.head.get("kind") == "kernel" else "train"

    def median(self, field: str) -> Optional[float]:
        values = [r[field] for r in self.ok if isinstance(r.get(field), (int, float))]
        return float(median(values)) if values else None

    def samples(self, field: str) -> List[List[float]]:
        """One list of samples per measurement window (row)."""
        return [r[field] for r in self.ok if r.get(field)]

    def errors(self) -> List[str]:
        return [f"{r.get('status')}: {error_summary(r.get('error'))}" for r in self.rows if r.get("status") != "ok"]


def error_summary(error: Optional[str], limit: int = 240) -> str:
    """First and last line of an error: the runner's message, then the exception its stderr tail ends with."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    if not lines:
        return ""
    text = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def point_id(row: Dict[str, Any]) -> str:
    if row.get("point_key"):
        return str(row["point_key"])
    if row.get("kind") == "kernel":
        return "/".join(str(row.get(k)) for k in ("op", "impl", "dtype", "shape"))
    return "/".join(str(row.get(k)) for k in ("model", "opt", "train_method", "batch_size", "seq_len", "dtype"))


def group_points(rows: Sequence[Dict[str, Any]]) -> List[Point]:
    points: Dict[str, Point] = {}
    for row in rows:
        points.setdefault(point_id(row), Point(point_id(row), [])).rows.append(row)
    return list(points.values())


def setting_of(point: Point) -> str:
    """The point minus its opt-set (rows' ``setting_key``): what a baseline must share to be compared.
    Rows written before setting_key existed had keys model/opt/rest: the opt part is dropped."""
    head = point.head
    if head.get("setting_key"):
        return str(head["setting_key"])
    parts = point.key.split("/")
    if len(parts) > 2 and parts[1] == str(head.get("opt")):
        return "/".join(parts[:1] + parts[2:])
    return "/".join(str(head.get(k)) for k in ("model", "train_method", "batch_size", "seq_len", "dtype"))


def natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


if __name__ == "__main__":
    raise SystemExit(main())
