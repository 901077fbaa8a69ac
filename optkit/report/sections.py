"""Reports, step 4: report.md of one GPU kind and suite: the environment, one section per model
(table, notes, failed points, traces, convergence, figures, profile) and one for kernels.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any, Callable, Dict, List, Optional, Sequence

from optkit.report.caveats import caveat_lines
from optkit.report.entries import (
    KERNEL_BASELINE_IMPL,
    kernel_table,
    loss_gap,
    model_baseline_opt,
    suite_baseline_opt,
    train_table,
)
from optkit.report.headline import headline_lines
from optkit.report.scaling import scaling_section
from optkit.report.tables import DASH, KERNEL_COLUMNS, TRAIN_COLUMNS, sig, table_notes, write_tables
from optkit.results.runs import Point, Run, group_points, setting_of


def environment_block(runs: Sequence[Run]) -> str:
    run = runs[0]
    dirty = run.value("git_dirty")
    facts = [
        ("GPU", f"{run.value('gpu_name') or 'none (CPU)'} (`{run.gpu_slug}`)"),
        ("driver / CUDA", " / ".join(str(run.value(f"{k}_version", k) or DASH) for k in ("driver", "cuda"))),
        (
            "torch / triton / transformers",
            " / ".join(str(run.value(f"{k}_version", k) or DASH) for k in ("torch", "triton", "transformers")),
        ),
        ("python", run.value("python_version", "python")),
        ("git SHA", f"`{run.value('git_sha') or 'unknown'}`" + (" (uncommitted changes)" if dirty else "")),
        ("env fingerprint", run.value("env_fingerprint")),
        ("runs", ", ".join(f"`{r.run_id}` ({len(r.rows)} rows, {r.path})" for r in runs)),
    ]
    fingerprints = {r.value("env_fingerprint") for r in runs}
    if len(fingerprints) > 1:
        facts.append(("warning", f"runs differ in environment ({', '.join(map(str, fingerprints))}): merged anyway"))
    return "| | |\n|:---|:---|\n" + "\n".join(f"| {k} | {DASH if v is None else v} |" for k, v in facts)


def split_varying(keys: Sequence[str]) -> tuple:
    """({key: its parts that differ between keys}, the parts all keys share) of '/'-separated keys."""
    split = [k.split("/") for k in keys]
    if len({len(p) for p in split}) != 1:
        return {k: k for k in keys}, ""
    varying = [i for i in range(len(split[0])) if len({p[i] for p in split}) > 1]
    common = "/".join(part for i, part in enumerate(split[0]) if i not in varying)
    return {k: "/".join(p[i] for i in varying) for k, p in zip(keys, split)}, common


def label_entries(entries: Sequence[Dict[str, Any]], name_key: str, setting_key: str) -> str:
    """Give every entry ``setting_short`` (the part of its setting that varies) and a unique ``label``
    (name + setting_short); return the part of the settings all entries share."""
    short, common = split_varying(list(dict.fromkeys(e[setting_key] for e in entries)))
    for e in entries:
        e["setting_short"] = short[e[setting_key]]
        e["label"] = f"{e[name_key]} {e['setting_short']}".strip()
    counts = Counter(e["label"] for e in entries)
    for e in entries:
        if counts[e["label"]] > 1:  # one opt name with modified switches: the key's "name~hash" tells them apart
            e["label"] = f"{e['point_key'].rsplit('/', 1)[-1]} {e['setting_short']}".strip()
    return common


@dataclass
class FigureWriter:
    """Draws one figure into <out_dir>/figures and returns the Markdown that shows it."""

    out_dir: Path
    formats: Sequence[str]

    def __call__(self, plot: Callable[..., List[Path]], *args: Any, name: str, caption: str) -> List[str]:
        paths = plot(*args, self.out_dir / "figures" / name, formats=self.formats)
        if not paths:
            return []
        png = next((p for p in paths if p.suffix == ".png"), None)
        if png is not None:
            return [f"![{caption}](figures/{png.name})", ""]
        return [f"Figure: [{caption}](figures/{paths[0].name})", ""]


def train_section(model: str, points: List[Point], baseline_opt: str, figure: FigureWriter) -> List[str]:
    from optkit.report import curves as curve_plots
    from optkit.report import plots

    out_dir = figure.out_dir
    entries = train_table(points, baseline_opt)
    common = label_entries(entries, "opt", "setting")
    labels = {e["point_key"]: e["label"] for e in entries}
    varies = any(e["setting_short"] for e in entries)
    shared = f"All points: `{common}`" if common else "The points share no setting prefix"
    md = [
        f"## {model}",
        "",
        shared + ("; the setting column gives the rest." if varies else ""),
        "",
        write_tables(out_dir, model, TRAIN_COLUMNS, entries, "setting"),
        "",
    ]
    md += [table_notes(entries), ""] if table_notes(entries) else []
    failed = [e for e in entries if e["error"]]
    if failed:
        md += ["Points that did not finish (kept above with their status):", ""]
        md += [f"- `{labels[e['point_key']]}`: {e['error']}" for e in failed] + [""]
    traces = [
        (labels[e["point_key"]], os.path.relpath(Path(run_dir).resolve() / t, out_dir.resolve()))
        for e in entries
        for run_dir, t in e["traces"]
    ]
    if traces:
        md += ["Profiler traces: " + ", ".join(f"[{opt}]({path})" for opt, path in traces), ""]
    md += convergence_lines(points, baseline_opt, labels)
    md += figure(
        plots.speedup_bars, entries, f"{model}: speedup vs {baseline_opt}", name=f"{model}_speedup", caption="speedup"
    )
    md += figure(plots.phase_bars, entries, f"{model}: step time by phase", name=f"{model}_phases", caption="phases")
    md += figure(plots.memory_bars, entries, f"{model}: peak memory", name=f"{model}_memory", caption="memory")
    md += figure(
        curve_plots.scaling_lines,
        entries,
        f"{model}: scaling with sequence length",
        name=f"{model}_scaling",
        caption="scaling",
    )
    curves = {labels[p.key]: p.head["loss_curve"] for p in points if p.head.get("loss_curve")}
    base_curves = {labels[p.key]: _base_curve(points, p, baseline_opt) for p in points}
    md += figure(
        curve_plots.loss_curves,
        curves,
        base_curves,
        _gaps(points, baseline_opt, labels),
        f"{model}: loss",
        name=f"{model}_loss",
        caption="loss curves",
    )
    series = {labels[p.key]: p.head["nvml_series"] for p in points if p.head.get("nvml_series")}
    md += figure(
        curve_plots.vram_timeline,
        series,
        f"{model}: GPU memory over time (NVML)",
        name=f"{model}_vram",
        caption="VRAM over time",
    )
    from optkit.report.profile import profile_section

    return md + profile_section(model, points, labels, baseline_opt, figure)


def _base_curve(points: Sequence[Point], point: Point, baseline_opt: str) -> Optional[List[float]]:
    """The baseline's loss curve at the point's setting (None for the baseline itself)."""
    if point.head.get("opt") == baseline_opt:
        return None
    return next(
        (
            p.head.get("loss_curve")
            for p in points
            if p.head.get("opt") == baseline_opt and setting_of(p) == setting_of(point)
        ),
        None,
    )


def _gaps(points: Sequence[Point], baseline_opt: str, labels: Dict[str, str]) -> Dict[str, tuple]:
    gaps = {}
    for p in points:
        base = _base_curve(points, p, baseline_opt)
        if base and p.head.get("loss_curve"):
            gaps[labels[p.key]] = loss_gap(p.head["loss_curve"], base)
    return gaps


def convergence_lines(points: Sequence[Point], baseline_opt: str, labels: Dict[str, str]) -> List[str]:
    gaps = _gaps(points, baseline_opt, labels)
    if not gaps:
        return []
    lines = [
        f"Loss vs `{baseline_opt}` (same data, same seed): max gap over the common steps",
        "",
        "| point | steps | last loss | max abs gap | at step | relative |",
        "|:---|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        gap, step, rel = gaps.get(labels[p.key], (None, None, None))
        if gap is not None:
            curve = p.head["loss_curve"]
            lines.append(
                f"| {labels[p.key]} | {len(curve)} | {sig(curve[-1], 4)} | {sig(gap, 3)} | {step} | "
                f"{DASH if rel is None else f'{100 * rel:.2f}%'} |"
            )
    return lines + [""]


def kernel_section(points: List[Point], figure: FigureWriter) -> List[str]:
    from optkit.report import plots

    out_dir = figure.out_dir
    entries = kernel_table(points)
    ceiling = median([e["copy_gbps"] for e in entries if e.get("copy_gbps")] or [0]) or None
    md = [
        "## Kernels (forward + backward)",
        "",
        f"Copy ceiling measured in the same run: {f'{ceiling:,.0f} GB/s' if ceiling else 'not measured'}. "
        "GB/s = bytes the op must move / median fwd+bwd time.",
        "",
        write_tables(out_dir, "kernels", KERNEL_COLUMNS, entries, "group"),
        "",
    ]
    md += [table_notes(entries), ""] if table_notes(entries) else []
    failed = [e for e in entries if e["error"]]
    md += [f"- `{e['point_key']}`: {e['error']}" for e in failed] + ([""] if failed else [])
    md += figure(
        plots.kernel_bandwidth,
        entries,
        ceiling,
        "Kernels: achieved bandwidth (fwd+bwd)",
        name="kernels_bandwidth",
        caption="kernel bandwidth",
    )
    return md


def write_report(
    runs: Sequence[Run], out_root: Path, baseline_opt: Optional[str] = None, formats: Sequence[str] = ("png", "pdf")
) -> Path:
    """reports/<slug>/<suite>/report.md (+ tables, figures) for runs of one GPU kind and suite."""
    slug, suite = runs[0].gpu_slug, runs[0].suite
    out_dir = Path(out_root) / slug / suite
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    rows = [row for run in runs for row in run.rows]
    base_opt = suite_baseline_opt(rows, baseline_opt)
    points = group_points(rows)
    by_model: Dict[str, List[Point]] = defaultdict(list)
    for p in points:
        if p.kind == "train":
            by_model[str(p.head.get("model"))].append(p)
    md = [
        f"# optkit report: suite `{suite}` on {runs[0].value('gpu_name') or 'CPU'}",
        "",
        environment_block(runs),
        "",
        *caveat_lines(runs),
        f"Speedup: tokens/s vs opt-set `{base_opt.split(',')[0]}` at the same point "
        f"(kernels: vs the {KERNEL_BASELINE_IMPL} impl), with a 95% bootstrap CI over step times and measurement "
        "windows. "
        "Bold: the best value of its column among the points of one setting.",
        "",
    ]
    md += headline_lines(points, base_opt.split(",")[0])  # runs of several processes per point: CI over them
    figure = FigureWriter(out_dir, formats)
    for model, model_points in by_model.items():
        model_base = model_baseline_opt(base_opt, model_points)
        if model_base != base_opt.split(",")[0]:
            md += [f"({model}: speedups vs `{model_base}`.)", ""]
        md += train_section(model, model_points, model_base, figure)
    md += scaling_section(points, out_dir)  # points of several GPUs (train.distributed): efficiency vs 1 GPU
    kernels = [p for p in points if p.kind == "kernel"]
    if kernels:
        md += kernel_section(kernels, figure)
    (out_dir / "report.md").write_text("\n".join(md).rstrip() + "\n")
    return out_dir / "report.md"
