"""What a sweep prints when it ends: a table that fits 100 columns (tokens/s, step split, peak memory, speedup
vs baseline), the reason of every point that is not ok below it, one line per cause of failure, and the exit
code a CI script reads.

The publication tables are report's job; this one is for the terminal, right after a run. A point measured
again (bench.retry=failed) is shown by its newest row: results.jsonl is append-only.
"""

from __future__ import annotations

import sys
import textwrap
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Tuple

from optkit.bench.process import last_exception_line

GIB = 1024**3
WIDTH = 100
FAILED_STATUSES = ("error", "timeout")  # a sweep with one of these exits non-zero; oom and skipped are answers
EXIT_OK, EXIT_POINT_FAILED = 0, 1
_SHRINKABLE = ("opt", "model")  # the columns cut (with an ellipsis) when the table is too wide


def latest_rows(rows: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The newest row of each (config_hash, repeat), in the order points first appeared."""
    newest: "OrderedDict[Tuple[Any, ...], Dict[str, Any]]" = OrderedDict()
    for index, row in enumerate(rows):
        key = (row.get("config_hash"), row.get("repeat")) if row.get("config_hash") else ("row", index)
        newest[key] = row
    return list(newest.values())


def error_reason(error: Any) -> str:
    """The line that says why a point failed: its error's first line, or, for a bare traceback, the exception
    line it ends with."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    if not lines:
        return ""
    if lines[0].startswith("Traceback"):
        return last_exception_line(lines) or lines[-1]
    return lines[0]


def _cells(row: Dict[str, Any], baseline_tps: Dict[Any, float]) -> List[str]:
    shape = f"{row.get('batch_size')}x{row.get('seq_len')}"
    head = [str(row.get("model")), str(row.get("opt")), shape, str(row.get("status"))]
    if row.get("status") != "ok":
        return head + [""] * 5
    tps = row.get("tokens_per_s") or 0
    base = baseline_tps.get(row.get("setting_key"))
    speedup = f"{tps / base:.2f}x" if base else "-"
    split = "/".join(f"{row.get(k) or 0:.1f}" for k in ("forward_ms", "backward_ms", "optimizer_ms"))
    peak = row.get("peak_nvml_device_bytes") or row.get("peak_reserved_bytes") or row.get("peak_rss_bytes")
    mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"
    return head + [f"{tps:,.0f}", speedup, split, f"{(peak or 0) / GIB:.2f}", mfu]


HEADER = ["model", "opt", "b x seq", "status", "tok/s", "speedup", "fwd/bwd/opt ms", "peak GiB", "MFU"]
LEFT = {"model", "opt", "status"}


def _widths(table: List[List[str]]) -> List[int]:
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    for name in _SHRINKABLE:  # cut the name columns until the table fits
        i = HEADER.index(name)
        excess = sum(widths) + 2 * (len(widths) - 1) - WIDTH
        if excess > 0:
            widths[i] = max(len(HEADER[i]), 12, widths[i] - excess)
    return widths


def _fit(text: str, width: int, left: bool) -> str:
    if len(text) > width:
        text = text[: width - 1] + "…"
    return f"{text:<{width}}" if left else f"{text:>{width}}"


def summary_lines(rows: Iterable[Dict[str, Any]], baseline_opt: str = "baseline") -> List[str]:
    rows = latest_rows(rows)
    baseline_tps = {
        r["setting_key"]: r["tokens_per_s"]
        for r in rows
        if r.get("status") == "ok" and r.get("opt") == baseline_opt and r.get("tokens_per_s")
    }
    reasons: "OrderedDict[str, int]" = OrderedDict()
    table = [HEADER]
    for row in rows:
        cells = _cells(row, baseline_tps)
        if row.get("status") != "ok":
            reason = f"{row.get('status')}: {error_reason(row.get('error')) or 'no reason recorded'}"
            number = reasons.setdefault(reason, len(reasons) + 1)
            cells[3] = f"{cells[3]} [{number}]"
        table.append(cells)
    widths = _widths(table)
    lines = []
    for cells in table:
        line = "  ".join(_fit(c, w, HEADER[i] in LEFT) for i, (c, w) in enumerate(zip(cells, widths)))
        lines.append(line.rstrip())
    lines.insert(1, "-" * len(lines[0]))
    for reason, number in reasons.items():
        lines += textwrap.wrap(reason, WIDTH, initial_indent=f"[{number}] ", subsequent_indent="    ")
    lines += textwrap.wrap(
        "peak GiB: NVML device-wide on a GPU, else the allocator's reserved, else host peak RSS (CPU)", WIDTH
    )
    if any(r.get("device") == "cpu" for r in rows):
        lines += textwrap.wrap(
            "CPU: optkit's Triton kernels run under Triton's interpreter here, so their speed says nothing; "
            "this run checks the pipeline, a GPU run measures",
            WIDTH,
        )
    return lines


def failure_lines(rows: Iterable[Dict[str, Any]]) -> List[str]:
    """One line per cause of the points that errored or timed out (their newest rows), with how many."""
    failed = [r for r in latest_rows(rows) if r.get("status") in FAILED_STATUSES]
    if not failed:
        return []
    causes: "OrderedDict[str, List[str]]" = OrderedDict()
    for row in failed:
        cause = f"{row.get('status')}: {error_reason(row.get('error')) or 'no reason recorded'}"
        causes.setdefault(cause, []).append(f"{row.get('model')}/{row.get('opt')}")
    lines = [f"{len(failed)} point(s) failed:"]
    for cause, points in causes.items():
        where = ", ".join(points[:3]) + (f" +{len(points) - 3}" if len(points) > 3 else "")
        lines.append(f"  {len(points)} x {cause[:400]} ({where})")
    return lines


def sweep_exit_code(rows: Iterable[Dict[str, Any]]) -> int:
    """0 when every point's newest row is ok, oom or skipped; 1 when one errored or timed out."""
    failed = any(r.get("status") in FAILED_STATUSES for r in latest_rows(rows))
    return EXIT_POINT_FAILED if failed else EXIT_OK


def print_summary(rows: Iterable[Dict[str, Any]], baseline_opt: str = "baseline", file=None) -> None:
    print("\n".join(summary_lines(rows, baseline_opt)), file=file or sys.stdout, flush=True)
