"""Reports, step 3: table entries -> cells and tables. Columns format raw values (significant digits,
GiB, %, speedup with its CI, note markers) and say which value is best; renderers write Markdown
(best value bold), booktabs LaTeX and CSV (raw values, full precision).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from optkit.report.entries import KERNEL_BASELINE_IMPL

GIB, MIB = 1024**3, 1024**2
DASH = "—"


def sig(value: float, digits: int = 3) -> str:
    """``digits`` significant digits without scientific notation: 0.0448, 12.3, 4,551."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


def ratio(value: float) -> str:
    """A ratio as 1.23, or to two significant digits below 0.1 (a point 300x slower is 0.0033, never 0.00)."""
    return f"{value:.2f}" if abs(value) >= 0.095 else sig(value, 2)


def _num(key: str, fmt: Callable[[float], str]) -> Callable[[Dict[str, Any]], str]:
    return lambda e: DASH if e.get(key) is None else fmt(e[key])


def _ratio_cell(e: Dict[str, Any]) -> str:
    if e.get("speedup_note") == "reference":
        return "1 (ref)"
    if e.get("speedup") is None:
        return f"{DASH} ({e['speedup_note']})" if e.get("speedup_note") else DASH
    if e.get("speedup_ci95_low") is None:
        return f"{ratio(e['speedup'])}×"
    return f"{ratio(e['speedup'])}× [{ratio(e['speedup_ci95_low'])}, {ratio(e['speedup_ci95_high'])}]"


def _marked(key: str, flag: str, mark: str, fmt=sig) -> Callable[[Dict[str, Any]], str]:
    return lambda e: DASH if e.get(key) is None else fmt(e[key]) + (mark if e.get(flag) else "")


@dataclass(frozen=True)
class Column:
    key: str  # raw value in the entry (what "best" compares)
    header: str
    cell: Callable[[Dict[str, Any]], str]
    better: Optional[str] = None  # "high" | "low" | None: which value is bold
    numeric: bool = True


def text_col(key: str, header: str) -> Column:
    return Column(key, header, lambda e: DASH if e.get(key) is None else str(e[key]), numeric=False)


TRAIN_COLUMNS = [
    text_col("opt", "opt"),
    text_col("setting_short", "setting"),
    text_col("status", "status"),
    Column("tokens_per_s", "tokens/s", _num("tokens_per_s", lambda v: f"{v:,.0f}" if v >= 100 else sig(v)), "high"),
    Column("energy_j_per_token", "J/token", _num("energy_j_per_token", sig), "low"),
    Column("avg_power_w", "avg W", _num("avg_power_w", lambda v: f"{v:,.0f}")),
    Column("speedup", "speedup [95% CI]", _ratio_cell, "high"),
    Column("mfu", "MFU", _num("mfu", lambda v: f"{100 * v:.1f}%"), "high"),
    Column("forward_ms", "fwd ms", _marked("forward_ms", "loss_in_forward", "†"), "low"),
    Column("backward_ms", "bwd ms", _num("backward_ms", sig), "low"),
    Column("optimizer_ms", "opt ms", _num("optimizer_ms", sig), "low"),
    Column("step_ms", "step ms", _marked("step_ms", "noisy", "~"), "low"),
    Column(
        "peak_nvml_bytes",
        "peak NVML GiB",
        lambda e: (
            DASH
            if e.get("peak_nvml_bytes") is None
            else f"{e['peak_nvml_bytes'] / GIB:.2f}" + ("*" if e.get("peak_nvml_source") == "device" else "")
        ),
        "low",
    ),
    Column(
        "peak_nvml_timed_bytes", "peak NVML timed GiB", _num("peak_nvml_timed_bytes", lambda v: f"{v / GIB:.2f}"), "low"
    ),
    Column("peak_allocated_bytes", "peak alloc GiB", _num("peak_allocated_bytes", lambda v: f"{v / GIB:.2f}"), "low"),
    Column("mem_saving", "mem saving", _num("mem_saving", lambda v: f"{100 * v:.1f}%"), "high"),
]
NOTES = {  # marker -> (entry test, meaning); only the notes whose marker appears in a table are printed
    "†": (
        lambda e: e.get("loss_in_forward") and (e.get("forward_ms") or e.get("fwd_ms")) is not None,
        "fused loss: its gradients are computed in forward, so backward work shows in fwd ms; compare fwd+bwd",
    ),
    "~": (lambda e: e.get("noisy"), "noisy: IQR/median of the timed samples > 10%"),
    "!": (lambda e: e.get("throttled"), "NVML saw the clocks throttled while this point was measured"),
    "*": (
        lambda e: e.get("peak_nvml_source") == "device" and e.get("peak_nvml_bytes") is not None,
        "NVML device-wide (this process's figure was unavailable)",
    ),
}


def table_notes(entries: Sequence[Dict[str, Any]]) -> str:
    return " ".join(f"{mark} {text}." for mark, (test, text) in NOTES.items() if any(test(e) for e in entries))


KERNEL_COLUMNS = [
    text_col("op", "op"),
    text_col("dtype", "dtype"),
    text_col("shape", "shape"),
    text_col("impl", "impl"),
    text_col("status", "status"),
    Column(
        "full_ms",
        "fwd+bwd ms",
        lambda e: _marked("full_ms", "noisy", "~")(e) + ("!" if e.get("throttled") else ""),
        "low",
    ),
    Column(
        "full_ms_p10",
        "p10-p90 ms",
        lambda e: DASH if e.get("full_ms_p10") is None else f"{sig(e['full_ms_p10'])}-{sig(e['full_ms_p90'])}",
        numeric=True,
    ),
    Column("fwd_ms", "fwd ms", _marked("fwd_ms", "loss_in_forward", "†"), "low"),
    Column("bwd_ms", "bwd ms", _num("bwd_ms", sig), "low"),
    Column("gbps_full", "GB/s", _num("gbps_full", lambda v: f"{v:,.0f}"), "high"),
    Column("frac_of_copy", "of copy", _num("frac_of_copy", lambda v: f"{100 * v:.0f}%"), "high"),
    Column("tflops_full", "TFLOP/s", _num("tflops_full", sig), "high"),
    Column("speedup", f"vs {KERNEL_BASELINE_IMPL} [95% CI]", _ratio_cell, "high"),
    Column("peak_delta_bytes", "peak delta MiB", _num("peak_delta_bytes", lambda v: f"{v / MIB:,.0f}"), "low"),
]


def best_cells(columns: Sequence[Column], entries: Sequence[Dict[str, Any]], group_key: str) -> set:
    """(row index, column key) of the best ok value per column within each group (ties all bold)."""
    best = set()
    groups = defaultdict(list)
    for i, e in enumerate(entries):
        if e.get("status") == "ok":
            groups[e.get(group_key)].append(i)
    for col in (c for c in columns if c.better):
        for members in groups.values():
            values = {i: entries[i][col.key] for i in members if isinstance(entries[i].get(col.key), (int, float))}
            if len(values) < 2:
                continue
            target = (max if col.better == "high" else min)(values.values())
            if all(v == target for v in values.values()):
                continue  # nothing to single out
            best.update((i, col.key) for i, v in values.items() if v == target)
    return best


def visible_columns(columns: Sequence[Column], entries: Sequence[Dict[str, Any]]) -> List[Column]:
    """Drop columns no entry has a value for (e.g. NVML on a CPU run, setting when it is constant)."""
    return [
        c
        for c in columns
        if c.key in ("opt", "status", "op", "impl") or any(e.get(c.key) not in (None, "") for e in entries)
    ]


def render_markdown(columns: Sequence[Column], entries: Sequence[Dict[str, Any]], group_key: str) -> str:
    best = best_cells(columns, entries, group_key)
    lines = [
        "| " + " | ".join(c.header for c in columns) + " |",
        "|" + "|".join("---:" if c.numeric else ":---" for c in columns) + "|",
    ]
    for i, e in enumerate(entries):
        cells = [c.cell(e).replace("|", "\\|") for c in columns]
        cells = [f"**{t}**" if (i, c.key) in best else t for c, t in zip(columns, cells)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "×": r"$\times$",
    DASH: "---",
    "†": r"\textsuperscript{\dag}",
    "*": r"\textsuperscript{*}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def render_latex(columns: Sequence[Column], entries: Sequence[Dict[str, Any]], group_key: str) -> str:
    """A booktabs tabular, ready for ``\\input``; groups (points) separated by a little space."""
    best = best_cells(columns, entries, group_key)
    lines = [
        r"% generated by optkit report; needs \usepackage{booktabs}",
        r"\begin{tabular}{" + " ".join("r" if c.numeric else "l" for c in columns) + "}",
        r"\toprule",
        " & ".join(latex_escape(c.header) for c in columns) + r" \\",
        r"\midrule",
    ]
    previous = None
    for i, e in enumerate(entries):
        if previous is not None and e.get(group_key) != previous:
            lines.append(r"\addlinespace")
        previous = e.get(group_key)
        cells = [latex_escape(c.cell(e)) for c in columns]
        lines.append(
            " & ".join(r"\textbf{" + t + "}" if (i, c.key) in best else t for c, t in zip(columns, cells)) + r" \\"
        )
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def write_csv(path: Path, entries: Sequence[Dict[str, Any]]) -> None:
    """Raw values (bytes, fractions, full precision): the CSV is for further analysis."""
    fields = [k for k in dict.fromkeys(k for e in entries for k in e) if k not in ("traces", "_run_dir")]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if e.get(k) is None else e.get(k)) for k in fields} for e in entries)


def write_tables(out_dir: Path, name: str, columns, entries, group_key: str) -> str:
    """<name>.csv and <name>.tex beside report.md; returns the Markdown table."""
    shown = visible_columns(columns, entries)
    write_csv(out_dir / f"{name}.csv", entries)
    (out_dir / f"{name}.tex").write_text(render_latex(shown, entries, group_key))
    links = f"Tables: [{name}.csv]({name}.csv), [{name}.tex]({name}.tex)"
    return render_markdown(shown, entries, group_key) + "\n\n" + links
