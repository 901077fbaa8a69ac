"""Reports across GPU kinds: reports/cross-gpu/<suite>/, one line per point with the GPU kinds side by
side (headline figure, speedup, ratio to the first GPU kind) and one figure with the GPU kind as an axis.

Only runs of one commit are paired: a difference between GPUs must not be a difference between code versions.
Of the commits every GPU kind has a run of, the newest is reported; with none in common the report says so
and pairs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from optkit.report.entries import KERNEL_BASELINE_IMPL, kernel_table, suite_baseline_opt, train_table
from optkit.report.sections import FigureWriter, environment_block, label_entries
from optkit.report.tables import DASH, Column, _num, _ratio_cell, text_col, write_tables
from optkit.results.runs import Run, finished_at, group_points


def _per_gpu_col(slug: str, key: str, header: str, fmt, better: Optional[str]) -> Column:
    def cell(e):
        value = e.get(f"{key}@{slug}")
        status = e.get(f"status@{slug}")
        if key == "speedup":
            return _ratio_cell({k.split("@")[0]: v for k, v in e.items() if k.endswith(f"@{slug}")})
        if value is None:
            return DASH if status in (None, "ok") else status
        return fmt(value)

    return Column(f"{key}@{slug}", f"{header} {slug}", cell, better)


def cross_gpu_table(per_gpu: Dict[str, List[Run]], baseline_opt: Optional[str]):
    """(entries, columns, headline key): one line per point, GPU kinds side by side."""
    slugs = list(per_gpu)
    tables = {}
    for slug, runs in per_gpu.items():
        rows = [r for run in runs for r in run.rows]
        points = group_points(rows)
        kernel = all(p.kind == "kernel" for p in points)
        tables[slug] = kernel_table(points) if kernel else train_table(points, suite_baseline_opt(rows, baseline_opt))
    kernel = "group" in next(iter(tables[slugs[0]]), {})
    head, head_header, head_fmt, head_better = (
        ("gbps_full", "GB/s", lambda v: f"{v:,.0f}", "high")
        if kernel
        else ("tokens_per_s", "tokens/s", lambda v: f"{v:,.0f}", "high")
    )
    merged: Dict[str, Dict[str, Any]] = {}
    for slug in slugs:
        for e in tables[slug]:
            line = merged.setdefault(
                e["point_key"],
                {
                    "point_key": e["point_key"],
                    "name": e.get("opt", e.get("impl")),
                    "group": e.get("group", e.get("setting")),
                    "status": "ok",
                },
            )
            for key in ("status", head, "speedup", "speedup_ci95_low", "speedup_ci95_high", "speedup_note"):
                line[f"{key}@{slug}"] = e.get(key)
    label_entries(list(merged.values()), "name", "group")
    for line in merged.values():
        first = line.get(f"{head}@{slugs[0]}")
        for slug in slugs[1:]:
            value = line.get(f"{head}@{slug}")
            line[f"ratio@{slug}"] = value / first if value and first else None
    columns = [text_col("label", "point")]
    columns += [_per_gpu_col(s, head, head_header, head_fmt, head_better) for s in slugs]
    columns += [_per_gpu_col(s, "speedup", "speedup", None, "high") for s in slugs]
    columns += [
        Column(f"ratio@{s}", f"{s} / {slugs[0]}", _num(f"ratio@{s}", lambda v: f"{v:.2f}×"), "high") for s in slugs[1:]
    ]
    return list(merged.values()), columns, head, head_header


def same_commit(per_gpu: Dict[str, List[Run]]) -> Tuple[Dict[str, List[Run]], Optional[str]]:
    """(the runs of the newest commit every GPU kind ran, its SHA); ({}, None) when they share none."""
    commits = {slug: {run.value("git_sha") for run in runs} - {None} for slug, runs in per_gpu.items()}
    shared = set.intersection(*commits.values()) if commits else set()
    if not shared:
        return {}, None

    def newest_row(sha: str) -> str:
        return max(finished_at(run) for runs in per_gpu.values() for run in runs if run.value("git_sha") == sha)

    sha = max(shared, key=newest_row)
    return {slug: [run for run in runs if run.value("git_sha") == sha] for slug, runs in per_gpu.items()}, sha


def write_cross_gpu(
    per_gpu: Dict[str, List[Run]],
    out_root: Path,
    baseline_opt: Optional[str] = None,
    formats: Sequence[str] = ("png", "pdf"),
) -> Path:
    """reports/cross-gpu/<suite>/: one table and one figure with the GPU kind as an axis."""
    from optkit.report import plots

    suite = next(iter(per_gpu.values()))[0].suite
    out_dir = Path(out_root) / "cross-gpu" / suite
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    slugs = list(per_gpu)
    md = [f"# optkit report: suite `{suite}` across GPUs ({', '.join(slugs)})", ""]
    paired, sha = same_commit(per_gpu)
    if sha is None:
        ran = "; ".join(
            f"{slug}: {', '.join(sorted(str(r.value('git_sha')) for r in runs))}" for slug, runs in per_gpu.items()
        )
        md += [
            f"No commit has a run on every GPU kind ({ran}): nothing is paired. Run the suite at one commit on each.",
            "",
        ]
        (out_dir / "report.md").write_text("\n".join(md))
        return out_dir / "report.md"
    per_gpu = paired
    md += [f"Runs of commit `{sha}` only (GPU kinds compared at one code version).", ""]
    entries, columns, head, head_header = cross_gpu_table(per_gpu, baseline_opt)
    for slug, runs in per_gpu.items():
        md += [f"### {slug}", "", environment_block(runs), ""]
    md += ["## Side by side", "", write_tables(out_dir, "cross_gpu", columns, entries, "group"), ""]
    labels = [e["label"] for e in entries]
    panels = [
        (head_header, {s: [e.get(f"{head}@{s}") for e in entries] for s in slugs}),
        (
            f"speedup vs {KERNEL_BASELINE_IMPL if head == 'gbps_full' else 'baseline'}",
            {s: [e.get(f"speedup@{s}") for e in entries] for s in slugs},
        ),
    ]
    md += FigureWriter(out_dir, formats)(
        plots.cross_gpu_bars, labels, panels, f"{suite}: {' vs '.join(slugs)}", name="cross_gpu", caption="cross-GPU"
    )
    (out_dir / "report.md").write_text("\n".join(md).rstrip() + "\n")
    return out_dir / "report.md"
