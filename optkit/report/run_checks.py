"""Checks of a run's files and rows, shared by report and regress: loading so that no input file gives a
traceback, and rows whose numbers contradict each other.

- ``env.json`` that is not a JSON object (corrupt, truncated, not UTF-8): a ReportInputError naming the file
  and the fix.
- Lines of ``results.jsonl`` that hold no result row are skipped, counted and named ``file:line``: a torn
  line (a kill mid-write), JSON that is not an object (``[1, 2, 3]``), an object without a status (``{}``,
  which would otherwise become a point and a section called "None"). results/rows.py's scan names the first
  two kinds; the third is this module's.
- A run without one valid row: a ReportInputError.
- An ok training row whose stored tokens/s is not tokens_per_step / its median step time (beyond
  TOKENS_PER_S_RTOL): an edited row or a broken writer. Report warns; regress fails the candidate.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from statistics import median
from typing import Any, Dict, List, Optional, Sequence

from optkit.results.rows import scan_rows
from optkit.results.runs import ReportInputError, Run, load_run, point_id

STACK_FIELDS = (
    ("GPU", ("gpu_name",)),
    ("driver", ("driver_version", "driver")),
    ("CUDA", ("cuda_version", "cuda")),
    ("torch", ("torch_version", "torch")),
    ("triton", ("triton_version", "triton")),
    ("transformers", ("transformers_version", "transformers")),
)
TOKENS_PER_S_RTOL = 1e-3  # the writer computes tokens/s from the same step times: JSON rounding moves it ~1e-6


def is_result_row(row: Dict[str, Any]) -> bool:
    """A row the runner wrote: it always has a status and says which point it is."""
    return bool(row.get("status")) and any(row.get(k) for k in ("point_key", "model", "op"))


def bad_lines(results_path: Path) -> List[str]:
    """``file:line (reason)`` for every non-blank line of a results.jsonl that holds no result row."""
    results_path = Path(results_path)
    rows, unparsed = scan_rows(results_path)
    named = {b.number: b.reason for b in unparsed}
    if rows:
        # scan_rows keeps every JSON object, in file order: pair them with their line numbers to name those
        # that are no result row.
        with open(results_path, "rb") as fh:
            numbers = [n for n, raw in enumerate(fh, start=1) if raw.strip() and n not in named]
        for number, row in zip(numbers, rows):
            if not is_result_row(row):
                named[number] = "an object without status and point: not a result row"
    return [f"{results_path}:{n} ({named[n]})" for n in sorted(named)]


def listed(items: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` items, comma-separated, and how many more."""
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def describe(lines: List[str]) -> str:
    """One line naming the bad lines (the first five, then a count)."""
    return f"{len(lines)} line(s) hold no result row and are skipped: {listed(lines)}"


def _implied_tokens_per_s(row: Dict[str, Any]) -> Optional[float]:
    steps = row.get("step_times_ms")
    step_ms = median(steps) if steps else row.get("step_ms")
    return row["tokens_per_step"] * 1e3 / step_ms if step_ms else None


def tokens_per_s_mismatches(run: Run) -> List[str]:
    """``point window N: stored X vs Y`` for every ok row whose tokens/s its own step times contradict."""
    out = []
    for row in run.rows:
        stored = row.get("tokens_per_s")
        if row.get("status") != "ok" or stored is None or not row.get("tokens_per_step"):
            continue
        try:
            implied = _implied_tokens_per_s(row)
            if implied is None or abs(stored / implied - 1.0) <= TOKENS_PER_S_RTOL:
                continue
            shown = f"{implied:,.1f}"
        except (TypeError, ValueError, ZeroDivisionError):
            shown = "unreadable step times"
        out.append(f"`{point_id(row)}` window {row.get('repeat')}: stored {stored} vs {shown}")
    return out


def _check_env(env_path: Path) -> None:
    if not env_path.exists():
        return
    fix = "restore it from the machine that ran, or delete it (the environment is then read from the rows)"
    try:
        env = json.loads(env_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ReportInputError(f"{env_path} is not valid JSON{where}: {fix}") from None
    if not isinstance(env, dict):
        raise ReportInputError(f"{env_path} holds a JSON {type(env).__name__}, not an object: {fix}")


def load_checked(run_dir, prog: str) -> Run:
    """load_run with the checks above; skipped lines are reported on stderr as one line from ``prog``."""
    path = Path(run_dir)
    results = path / "results.jsonl"
    if not results.is_file():
        return load_run(path)  # raises its own error naming what to pass
    _check_env(path / "env.json")
    skipped = bad_lines(results)
    rows, _ = scan_rows(results)
    if not any(is_result_row(r) for r in rows):
        named = f" ({describe(skipped)})" if skipped else ""
        raise ReportInputError(
            f"{results} holds no valid result row{named}: pass a run directory the runner wrote rows to"
        )
    with contextlib.redirect_stderr(io.StringIO()):  # its warning names only some of the lines: ours names all
        run = load_run(path)
    run.rows = [r for r in run.rows if is_result_row(r)]
    if skipped:
        print(f"{prog}: warning: {describe(skipped)}", file=sys.stderr)
    return run


def stack_differences(baseline: Run, candidate: Run) -> List[str]:
    diffs = []
    for label, keys in STACK_FIELDS:
        a, b = baseline.value(*keys), candidate.value(*keys)
        if a != b:
            diffs.append(f"{label} {a} -> {b}")
    return diffs


def check_inputs(baseline: Run, candidate: Run, strict_env: bool) -> List[str]:
    """Warnings; raises ReportInputError when the runs cannot be compared."""
    if baseline.gpu_slug != candidate.gpu_slug:
        raise ReportInputError(
            f"baseline ran on '{baseline.gpu_slug}', candidate on '{candidate.gpu_slug}': compare runs of one GPU "
            f"kind (results/{candidate.gpu_slug}/<suite>/...), or use `optkit report` for a cross-GPU table"
        )
    diffs = stack_differences(baseline, candidate)
    schemas = ({r.get("schema_version") for r in baseline.rows}, {r.get("schema_version") for r in candidate.rows})
    if schemas[0] != schemas[1]:
        diffs.append(
            f"row schema {sorted(schemas[0], key=str)} -> {sorted(schemas[1], key=str)} (what changed: "
            "the history in optkit/results/rows.py)"
        )
    if diffs and strict_env:
        raise ReportInputError("software stack differs (--strict-env): " + "; ".join(diffs))
    return [f"software stack differs, the verdict includes its effect: {'; '.join(diffs)}"] if diffs else []
