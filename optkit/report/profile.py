"""Report sections of profiled points (bench.profile): where a step's time went, and VRAM within a step.

Per model, ``profile_section`` writes:
- a kernel-share table, one line per profiled point (opt-set): the share of the profiled step spent
  in each of optkit.measure.profile.CATEGORIES, the total it is a share of, and a link to the trace
  (also as ``<model>_kernel_share.csv`` / ``.tex``); the top kernels of each point, folded;
- a figure "VRAM over one step": NVML device memory within one step, the baseline and every other
  opt-set of one setting on one axis. The step is the profiled one; without a profile, the last timed
  step of a window, cut from the NVML series by the window's end mark and its step time.

Pure functions of result rows, like the other report_* modules (report_sections calls this one).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from optkit.measure.profile import CATEGORIES, TIME_SOURCE_CPU


def step_vram_series(row: Dict[str, Any]) -> Optional[List[List[float]]]:
    """[[ms since the step began, NVML used bytes], ...] of one step of ``row``, or None.

    Prefers the full-rate ``nvml_step_series``; rows without it are cut from the (downsampled)
    ``nvml_series``: the profiled step's marks, else the window's last step, which ended at the
    window's end mark (the timer synchronizes there) and lasted its last ``step_times_ms``."""
    if row.get("nvml_step_series"):
        return row["nvml_step_series"]
    series = row.get("nvml_series")
    if not series:
        return None
    step = row.get("nvml_profiled_step_ms")
    window, times = row.get("nvml_timed_window_ms"), row.get("step_times_ms")
    if not step and window and times:
        step = [window[1] - times[-1], window[1]]
    if not step:
        return None
    inside = [[round(t - step[0], 1), used] for t, used in series if step[0] <= t <= step[1]]
    return inside if len(inside) >= 2 else None


def _profiled_row(point) -> Optional[Dict[str, Any]]:
    return next((r for r in point.ok if r.get("profile_kernel_share")), None)


def _step_row(point) -> Optional[Dict[str, Any]]:
    """The row whose step to draw: a profiled one first (its step is the one in the trace)."""
    rows = sorted(point.ok, key=lambda r: not r.get("nvml_profiled_step_ms"))
    return next((r for r in rows if step_vram_series(r)), None)


def share_entries(points: Sequence[Any], labels: Dict[str, str], out_dir: Path) -> List[Dict[str, Any]]:
    """One entry per profiled point: ``share:<category>`` percentages, the total, the trace's link."""
    entries = []
    for p in points:
        row = _profiled_row(p)
        if row is None:
            continue
        entry = {
            "point_key": p.key,
            "label": labels.get(p.key, p.key),
            "opt": row.get("opt"),
            "setting": row.get("setting_key"),
            "status": "ok",
            "profile_step_ms": row.get("profile_step_ms"),
            "profile_time_source": row.get("profile_time_source"),
            "top": row.get("profile_top_kernels") or [],
        }
        entry.update({f"share:{s['category']}": s["share_pct"] for s in row["profile_kernel_share"]})
        if row.get("trace_path") and row.get("_run_dir"):
            trace = Path(row["_run_dir"]).resolve() / row["trace_path"]
            entry["trace_link"] = os.path.relpath(trace, Path(out_dir).resolve())
        entries.append(entry)
    return entries


def _share_columns(report_tables, entries):
    cpu = any(e.get("profile_time_source") == TIME_SOURCE_CPU for e in entries)
    total_header = "host op ms" if cpu else "device ms"
    columns = [report_tables.text_col("label", "point")]
    columns += [
        report_tables.Column(f"share:{c}", f"{c} %", report_tables._num(f"share:{c}", lambda v: f"{v:.1f}"))
        for c in CATEGORIES
    ]
    columns.append(
        report_tables.Column("profile_step_ms", total_header, report_tables._num("profile_step_ms", report_tables.sig))
    )
    return columns


def _top_kernels_block(entry: Dict[str, Any]) -> List[str]:
    if not entry["top"]:
        return []
    lines = [
        f"<details><summary>top kernels: {entry['label']}</summary>",
        "",
        "| kernel | category | calls | total ms |",
        "|:---|:---|---:|---:|",
    ]
    for k in entry["top"]:
        name = str(k["name"]).replace("|", "\\|").replace("`", "'")
        lines.append(f"| `{name}` | {k['category']} | {k['calls']} | {k['total_ms']:.3f} |")
    return lines + ["", "</details>", ""]


def _vram_series_by_label(points: Sequence[Any], labels: Dict[str, str], baseline_opt: str, setting_of):
    """{label: series} of the setting with the most drawable steps, baseline first; and that setting."""
    drawable = [(p, _step_row(p)) for p in points]
    drawable = [(p, r) for p, r in drawable if r is not None]
    if not drawable:
        return {}, None
    setting = Counter(setting_of(p) for p, _ in drawable).most_common(1)[0][0]
    chosen = sorted(
        ((p, r) for p, r in drawable if setting_of(p) == setting), key=lambda pr: pr[0].head.get("opt") != baseline_opt
    )
    return {labels.get(p.key, p.key): step_vram_series(r) for p, r in chosen}, setting


def profile_section(model: str, points: Sequence[Any], labels: Dict[str, str], baseline_opt: str, figure) -> List[str]:
    """Markdown (and files) of the kernel-share table and the VRAM-over-one-step figure; [] if no data."""
    from optkit.report import curves as curve_plots
    from optkit.report import tables as report_tables
    from optkit.results import runs

    out_dir = figure.out_dir
    md: List[str] = []
    entries = share_entries(points, labels, out_dir)
    if entries:
        columns = _share_columns(report_tables, entries)
        report_tables.write_csv(
            out_dir / f"{model}_kernel_share.csv", [{k: v for k, v in e.items() if k != "top"} for e in entries]
        )
        (out_dir / f"{model}_kernel_share.tex").write_text(report_tables.render_latex(columns, entries, "setting"))
        link = report_tables.Column(
            "trace_link",
            "trace",
            lambda e: f"[trace]({e['trace_link']})" if e.get("trace_link") else report_tables.DASH,
            numeric=False,
        )
        source = (
            "host op self time (no CUDA: Python outside ops not counted)"
            if any(e.get("profile_time_source") == TIME_SOURCE_CPU for e in entries)
            else "device time of the step's kernels, memcpys and memsets (summed over streams)"
        )
        md += [
            f"### {model}: where one step's time goes (profiled)",
            "",
            f"Share of one extra, untimed step profiled after the timed windows; 100% = its {source}. "
            "optkit = optkit's Triton kernels; optimizer = everything launched in the optimizer's step.",
            "",
            report_tables.render_markdown(columns + [link], entries, "setting"),
            "",
            f"Tables: [{model}_kernel_share.csv]({model}_kernel_share.csv), "
            f"[{model}_kernel_share.tex]({model}_kernel_share.tex)",
            "",
        ]
        for entry in entries:
            md += _top_kernels_block(entry)
    series, setting = _vram_series_by_label(points, labels, baseline_opt, runs.setting_of)
    if series:
        md += figure(
            curve_plots.vram_step,
            series,
            f"{model}: VRAM over one step ({setting})",
            name=f"{model}_vram_step",
            caption="VRAM over one step",
        )
    return md
