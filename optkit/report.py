"""Reports: result runs -> tables (Markdown, CSV, LaTeX) and figures, per GPU kind and suite.

``optkit report RUN_DIR... [--out reports]`` writes ``reports/<gpu-slug>/<suite>/``: report.md, one
.csv and one booktabs .tex table per model (and ``kernels.*``), figures/*.png|pdf. Run dirs of
several GPU kinds for one suite add ``reports/cross-gpu/<suite>/``. Of several runs of one GPU kind
and suite the newest is reported; ``--merge`` pools them (rows of one point become extra windows).

Pure functions of the result files: no GPU, no torch. Definitions the tables use:
- speedup: tokens/s of an opt-set over tokens/s of the suite's baseline opt-set (``opt ==
  suite.baseline_opt``, default "baseline") at the same point (key minus model and opt). Its 95% CI
  is a bootstrap of the ratio of median step times (measure.stats.ratio_ci: steps resampled within each
  measurement window, windows resampled when there are repeats). Kernels: vs the eager impl.
- peak NVML: this process's peak when NVML could see it, else device-wide (marked *); peak NVML
  timed: device-wide, over the timed steps only (not the model build).
- mem saving: 1 - peak / baseline's peak, on NVML when both have it, else on the allocator peak.
A point that failed (oom, error, skipped, timeout) keeps its line, with its status and error.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any, Callable, Dict, List, Optional, Sequence

from optkit.measure.stats import pooled_median, ratio_ci
from optkit.results import read_run

GIB, MIB = 1024 ** 3, 1024 ** 2
DASH = "—"
KERNEL_BASELINE_IMPL = "eager"


class ReportInputError(ValueError):
    """Input that cannot be reported on; the message says what to pass instead."""


# --------------------------------------------------------------------------- loading


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


# --------------------------------------------------------------------------- points


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


# --------------------------------------------------------------------------- table entries


def _scaled_ratio(num: Point, den: Point, field: str, scale: float = 1.0):
    """ratio of pooled medians (num / den) x scale, with its bootstrap CI; Nones without samples."""
    ratio, low, high = ratio_ci(num.samples(field), den.samples(field))
    if ratio is None:
        return None, None, None
    return ratio * scale, low * scale, high * scale


def train_entry(point: Point, base: Optional[Point]) -> Dict[str, Any]:
    head = point.head
    entry = {k: head.get(k) for k in ("model", "opt", "batch_size", "seq_len", "train_method", "loss_in_forward")}
    entry.update(point_key=point.key, setting=setting_of(point), status=point.status, windows=len(point.ok),
                 steps=sum(len(s) for s in point.samples("step_times_ms")), error="; ".join(point.errors()) or None,
                 traces=[(r["_run_dir"], r["trace_path"]) for r in point.rows if r.get("trace_path")])
    if point.ok:
        step_ms = pooled_median(point.samples("step_times_ms")) or point.median("step_ms")
        tokens = point.median("tokens_per_step")
        nvml_process = point.median("peak_nvml_process_bytes")
        nvml = nvml_process if nvml_process is not None else point.median("peak_nvml_device_bytes")
        entry.update(step_ms=step_ms, tokens_per_s=tokens * 1e3 / step_ms if tokens and step_ms
                     else point.median("tokens_per_s"), mfu=point.median("mfu"), forward_ms=point.median("forward_ms"),
                     backward_ms=point.median("backward_ms"), optimizer_ms=point.median("optimizer_ms"),
                     peak_nvml_bytes=nvml,
                     peak_nvml_source="process" if nvml_process is not None else "device",
                     peak_allocated_bytes=point.median("peak_allocated_bytes"),
                     peak_nvml_timed_bytes=point.median("peak_nvml_timed_device_bytes"),
                     noisy=any(r.get("step_ms_noisy") for r in point.ok))
    if base is None:
        return entry
    if base is point:
        entry.update(speedup=1.0 if point.ok else None, speedup_note="reference" if point.ok else None)
        return entry
    if not base.ok:
        entry["speedup_note"] = f"baseline {base.status}"  # a gain only because the baseline failed
        return entry
    if not point.ok:
        return entry
    base_entry = train_entry(base, None)
    tokens_scale = (point.median("tokens_per_step") or 1.0) / (base.median("tokens_per_step") or 1.0)
    ratio, low, high = _scaled_ratio(base, point, "step_times_ms", tokens_scale)
    if ratio is None and entry.get("tokens_per_s") and base_entry.get("tokens_per_s"):
        ratio = entry["tokens_per_s"] / base_entry["tokens_per_s"]
    entry.update(speedup=ratio, speedup_ci95_low=low, speedup_ci95_high=high)
    for field in ("peak_nvml_bytes", "peak_allocated_bytes"):
        if entry.get(field) and base_entry.get(field):
            entry.update(mem_saving=1.0 - entry[field] / base_entry[field], mem_saving_source=field)
            break
    return entry


def train_table(points: Sequence[Point], baseline_opt: str) -> List[Dict[str, Any]]:
    bases: Dict[str, Point] = {}
    for p in points:
        if p.head.get("opt") == baseline_opt:
            bases.setdefault(setting_of(p), p)
    order = {p.key: i for i, p in enumerate(points)}
    entries = [train_entry(p, bases.get(setting_of(p))) for p in points]
    return sorted(entries, key=lambda e: (natural_key(e["setting"]), e["opt"] != baseline_opt, order[e["point_key"]]))


def kernel_table(points: Sequence[Point], baseline_impl: str = KERNEL_BASELINE_IMPL) -> List[Dict[str, Any]]:
    def group(p: Point) -> str:
        return "/".join(str(p.head.get(k)) for k in ("op", "dtype", "shape"))

    bases = {group(p): p for p in points if p.head.get("impl") == baseline_impl}
    entries = []
    for p in points:
        head, base = p.head, bases.get(group(p))
        entry = {k: head.get(k) for k in ("op", "impl", "dtype", "shape", "tokens", "hidden", "loss_in_forward")}
        entry.update(point_key=p.key, group=group(p), status=p.status, error="; ".join(p.errors()) or None)
        if p.ok:
            full_ms = pooled_median(p.samples("full_times_ms")) or p.median("full_ms")
            nbytes = p.median("bytes_full")
            entry.update(full_ms=full_ms, full_ms_p10=p.median("full_ms_p10"), full_ms_p90=p.median("full_ms_p90"),
                         fwd_ms=p.median("fwd_ms"), bwd_ms=p.median("bwd_ms"), bytes_full=nbytes,
                         gbps_full=nbytes / (full_ms * 1e-3) / 1e9 if nbytes and full_ms else p.median("gbps_full"),
                         copy_gbps=p.median("copy_gbps"), peak_delta_bytes=p.median("peak_delta_bytes"),
                         tflops_full=p.median("tflops_full"), noisy=any(r.get("full_ms_noisy") for r in p.ok),
                         throttled=any(r.get("throttled") for r in p.ok))
            if entry["gbps_full"] and entry["copy_gbps"]:
                entry["frac_of_copy"] = entry["gbps_full"] / entry["copy_gbps"]
        if base is p and p.ok:
            entry.update(speedup=1.0, speedup_note="reference")
        elif base is not None and p.ok and base.ok:
            ratio, low, high = _scaled_ratio(base, p, "full_times_ms")
            entry.update(speedup=ratio, speedup_ci95_low=low, speedup_ci95_high=high)
        elif base is not None and not base.ok:
            entry["speedup_note"] = f"{baseline_impl} {base.status}"
        entries.append(entry)
    order = {e["group"]: i for i, e in reversed(list(enumerate(entries)))}
    return sorted(entries, key=lambda e: (order[e["group"]], e["impl"] != baseline_impl))


def loss_gap(curve: Sequence[float], base_curve: Sequence[float]):
    """(max |loss - baseline loss| over the common steps, at which step, relative to baseline there)."""
    gaps = [(abs(a - b), i, b) for i, (a, b) in enumerate(zip(curve, base_curve)) if a is not None and b is not None]
    if not gaps:
        return None, None, None
    gap, step, base = max(gaps)
    return gap, step, gap / abs(base) if base else None


# --------------------------------------------------------------------------- rendering


def sig(value: float, digits: int = 3) -> str:
    """``digits`` significant digits without scientific notation: 0.0448, 12.3, 4,551."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


def _num(key: str, fmt: Callable[[float], str]) -> Callable[[Dict[str, Any]], str]:
    return lambda e: DASH if e.get(key) is None else fmt(e[key])


def _ratio_cell(e: Dict[str, Any]) -> str:
    if e.get("speedup_note") == "reference":
        return "1 (ref)"
    if e.get("speedup") is None:
        return f"{DASH} ({e['speedup_note']})" if e.get("speedup_note") else DASH
    if e.get("speedup_ci95_low") is None:
        return f"{e['speedup']:.2f}×"
    return f"{e['speedup']:.2f}× [{e['speedup_ci95_low']:.2f}, {e['speedup_ci95_high']:.2f}]"


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
    text_col("opt", "opt"), text_col("setting_short", "setting"), text_col("status", "status"),
    Column("tokens_per_s", "tokens/s", _num("tokens_per_s", lambda v: f"{v:,.0f}" if v >= 100 else sig(v)), "high"),
    Column("speedup", "speedup [95% CI]", _ratio_cell, "high"),
    Column("mfu", "MFU", _num("mfu", lambda v: f"{100 * v:.1f}%"), "high"),
    Column("forward_ms", "fwd ms", _marked("forward_ms", "loss_in_forward", "†"), "low"),
    Column("backward_ms", "bwd ms", _num("backward_ms", sig), "low"),
    Column("optimizer_ms", "opt ms", _num("optimizer_ms", sig), "low"),
    Column("step_ms", "step ms", _marked("step_ms", "noisy", "~"), "low"),
    Column("peak_nvml_bytes", "peak NVML GiB",
           lambda e: DASH if e.get("peak_nvml_bytes") is None else
           f"{e['peak_nvml_bytes'] / GIB:.2f}" + ("*" if e.get("peak_nvml_source") == "device" else ""), "low"),
    Column("peak_nvml_timed_bytes", "peak NVML timed GiB",
           _num("peak_nvml_timed_bytes", lambda v: f"{v / GIB:.2f}"), "low"),
    Column("peak_allocated_bytes", "peak alloc GiB", _num("peak_allocated_bytes", lambda v: f"{v / GIB:.2f}"), "low"),
    Column("mem_saving", "mem saving", _num("mem_saving", lambda v: f"{100 * v:.1f}%"), "high"),
]
NOTES = {  # marker -> (entry test, meaning); only the notes whose marker appears in a table are printed
    "†": (lambda e: e.get("loss_in_forward") and (e.get("forward_ms") or e.get("fwd_ms")) is not None,
          "fused loss: its gradients are computed in forward, so backward work shows in fwd ms; compare fwd+bwd"),
    "~": (lambda e: e.get("noisy"), "noisy: IQR/median of the timed samples > 10%"),
    "!": (lambda e: e.get("throttled"), "NVML saw the clocks throttled while this point was measured"),
    "*": (lambda e: e.get("peak_nvml_source") == "device" and e.get("peak_nvml_bytes") is not None,
          "NVML device-wide (this process's figure was unavailable)"),
}


def table_notes(entries: Sequence[Dict[str, Any]]) -> str:
    return " ".join(f"{mark} {text}." for mark, (test, text) in NOTES.items() if any(test(e) for e in entries))


KERNEL_COLUMNS = [
    text_col("op", "op"), text_col("dtype", "dtype"), text_col("shape", "shape"), text_col("impl", "impl"),
    text_col("status", "status"),
    Column("full_ms", "fwd+bwd ms", lambda e: _marked("full_ms", "noisy", "~")(e) + ("!" if e.get("throttled") else ""),
           "low"),
    Column("full_ms_p10", "p10-p90 ms", lambda e: DASH if e.get("full_ms_p10") is None else
           f"{sig(e['full_ms_p10'])}-{sig(e['full_ms_p90'])}", numeric=True),
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
    return [c for c in columns
            if c.key in ("opt", "status", "op", "impl") or any(e.get(c.key) not in (None, "") for e in entries)]


def render_markdown(columns: Sequence[Column], entries: Sequence[Dict[str, Any]], group_key: str) -> str:
    best = best_cells(columns, entries, group_key)
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---:" if c.numeric else ":---" for c in columns) + "|"]
    for i, e in enumerate(entries):
        cells = [c.cell(e).replace("|", "\\|") for c in columns]
        cells = [f"**{t}**" if (i, c.key) in best else t for c, t in zip(columns, cells)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "×": r"$\times$", DASH: "---", "†": r"\textsuperscript{\dag}", "*": r"\textsuperscript{*}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def render_latex(columns: Sequence[Column], entries: Sequence[Dict[str, Any]], group_key: str) -> str:
    """A booktabs tabular, ready for ``\\input``; groups (points) separated by a little space."""
    best = best_cells(columns, entries, group_key)
    lines = [r"% generated by optkit report; needs \usepackage{booktabs}",
             r"\begin{tabular}{" + " ".join("r" if c.numeric else "l" for c in columns) + "}", r"\toprule",
             " & ".join(latex_escape(c.header) for c in columns) + r" \\", r"\midrule"]
    previous = None
    for i, e in enumerate(entries):
        if previous is not None and e.get(group_key) != previous:
            lines.append(r"\addlinespace")
        previous = e.get(group_key)
        cells = [latex_escape(c.cell(e)) for c in columns]
        lines.append(" & ".join(r"\textbf{" + t + "}" if (i, c.key) in best else t
                                for c, t in zip(columns, cells)) + r" \\")
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


# --------------------------------------------------------------------------- report.md


def environment_block(runs: Sequence[Run]) -> str:
    run = runs[0]
    dirty = run.value("git_dirty")
    facts = [("GPU", f"{run.value('gpu_name') or 'none (CPU)'} (`{run.gpu_slug}`)"),
             ("driver / CUDA", " / ".join(str(run.value(f"{k}_version", k) or DASH) for k in ("driver", "cuda"))),
             ("torch / triton / transformers", " / ".join(str(run.value(f"{k}_version", k) or DASH) for k in
                                                          ("torch", "triton", "transformers"))),
             ("python", run.value("python_version", "python")),
             ("git SHA", f"`{run.value('git_sha') or 'unknown'}`" + (" (uncommitted changes)" if dirty else "")),
             ("env fingerprint", run.value("env_fingerprint")),
             ("runs", ", ".join(f"`{r.run_id}` ({len(r.rows)} rows, {r.path})" for r in runs))]
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
    from optkit import plots

    out_dir = figure.out_dir
    entries = train_table(points, baseline_opt)
    common = label_entries(entries, "opt", "setting")
    labels = {e["point_key"]: e["label"] for e in entries}
    varies = any(e["setting_short"] for e in entries)
    shared = f"All points: `{common}`" if common else "The points share no setting prefix"
    md = [f"## {model}", "", shared + ("; the setting column gives the rest." if varies else ""), "",
          write_tables(out_dir, model, TRAIN_COLUMNS, entries, "setting"), ""]
    md += [table_notes(entries), ""] if table_notes(entries) else []
    failed = [e for e in entries if e["error"]]
    if failed:
        md += ["Points that did not finish (kept above with their status):", ""]
        md += [f"- `{labels[e['point_key']]}`: {e['error']}" for e in failed] + [""]
    traces = [(labels[e["point_key"]], os.path.relpath(Path(run_dir).resolve() / t, out_dir.resolve()))
              for e in entries for run_dir, t in e["traces"]]
    if traces:
        md += ["Profiler traces: " + ", ".join(f"[{opt}]({path})" for opt, path in traces), ""]
    md += convergence_lines(points, baseline_opt, labels)
    md += figure(plots.speedup_bars, entries, f"{model}: speedup vs {baseline_opt}", name=f"{model}_speedup",
                 caption="speedup")
    md += figure(plots.phase_bars, entries, f"{model}: step time by phase", name=f"{model}_phases", caption="phases")
    md += figure(plots.memory_bars, entries, f"{model}: peak memory", name=f"{model}_memory", caption="memory")
    md += figure(plots.scaling_lines, entries, f"{model}: scaling with sequence length", name=f"{model}_scaling",
                 caption="scaling")
    curves = {labels[p.key]: p.head["loss_curve"] for p in points if p.head.get("loss_curve")}
    base_curves = {labels[p.key]: _base_curve(points, p, baseline_opt) for p in points}
    md += figure(plots.loss_curves, curves, base_curves, _gaps(points, baseline_opt, labels), f"{model}: loss",
                 name=f"{model}_loss", caption="loss curves")
    series = {labels[p.key]: p.head["nvml_series"] for p in points if p.head.get("nvml_series")}
    md += figure(plots.vram_timeline, series, f"{model}: GPU memory over time (NVML)", name=f"{model}_vram",
                 caption="VRAM over time")
    from optkit.report_profile import profile_section

    return md + profile_section(model, points, labels, baseline_opt, figure)


def _base_curve(points: Sequence[Point], point: Point, baseline_opt: str) -> Optional[List[float]]:
    """The baseline's loss curve at the point's setting (None for the baseline itself)."""
    if point.head.get("opt") == baseline_opt:
        return None
    return next((p.head.get("loss_curve") for p in points
                 if p.head.get("opt") == baseline_opt and setting_of(p) == setting_of(point)), None)


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
    lines = [f"Loss vs `{baseline_opt}` (same data, same seed): max gap over the common steps", "",
             "| point | steps | last loss | max abs gap | at step | relative |", "|:---|---:|---:|---:|---:|---:|"]
    for p in points:
        gap, step, rel = gaps.get(labels[p.key], (None, None, None))
        if gap is not None:
            curve = p.head["loss_curve"]
            lines.append(f"| {labels[p.key]} | {len(curve)} | {sig(curve[-1], 4)} | {sig(gap, 3)} | {step} | "
                         f"{DASH if rel is None else f'{100 * rel:.2f}%'} |")
    return lines + [""]


def kernel_section(points: List[Point], figure: FigureWriter) -> List[str]:
    from optkit import plots

    out_dir = figure.out_dir
    entries = kernel_table(points)
    ceiling = median([e["copy_gbps"] for e in entries if e.get("copy_gbps")] or [0]) or None
    md = ["## Kernels (forward + backward)", "",
          f"Copy ceiling measured in the same run: {f'{ceiling:,.0f} GB/s' if ceiling else 'not measured'}. "
          "GB/s = bytes the op must move / median fwd+bwd time.", "",
          write_tables(out_dir, "kernels", KERNEL_COLUMNS, entries, "group"), ""]
    md += [table_notes(entries), ""] if table_notes(entries) else []
    failed = [e for e in entries if e["error"]]
    md += [f"- `{e['point_key']}`: {e['error']}" for e in failed] + ([""] if failed else [])
    md += figure(plots.kernel_bandwidth, entries, ceiling, "Kernels: achieved bandwidth (fwd+bwd)",
                 name="kernels_bandwidth", caption="kernel bandwidth")
    return md


def suite_baseline_opt(rows: Sequence[Dict[str, Any]], override: Optional[str]) -> str:
    if override:
        return override
    for row in rows:
        opt = ((row.get("config") or {}).get("suite") or {}).get("baseline_opt")
        if opt:
            return opt
    return "baseline"


def model_baseline_opt(baseline_opt: str, points: Sequence[Point]) -> str:
    """``baseline_opt`` may list several opt-sets (``packed_per_layer,hf_loop``): a model's sections use the
    first of them that its points have (a suite mixing experiments has one reference per model)."""
    names = [n.strip() for n in baseline_opt.split(",") if n.strip()]
    present = {p.head.get("opt") for p in points}
    return next((n for n in names if n in present), names[0] if names else "baseline")


def write_report(runs: Sequence[Run], out_root: Path, baseline_opt: Optional[str] = None,
                 formats: Sequence[str] = ("png", "pdf")) -> Path:
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
    md = [f"# optkit report: suite `{suite}` on {runs[0].value('gpu_name') or 'CPU'}", "", environment_block(runs), "",
          f"Speedup: tokens/s vs opt-set `{base_opt.split(',')[0]}` at the same point (kernels: vs the {KERNEL_BASELINE_IMPL} "
          "impl), with a 95% bootstrap CI over step times and measurement windows. "
          "Bold: the best value of its column among the points of one setting.", ""]
    figure = FigureWriter(out_dir, formats)
    for model, model_points in by_model.items():
        model_base = model_baseline_opt(base_opt, model_points)
        if model_base != base_opt.split(",")[0]:
            md += [f"({model}: speedups vs `{model_base}`.)", ""]
        md += train_section(model, model_points, model_base, figure)
    kernels = [p for p in points if p.kind == "kernel"]
    if kernels:
        md += kernel_section(kernels, figure)
    (out_dir / "report.md").write_text("\n".join(md).rstrip() + "\n")
    return out_dir / "report.md"


# --------------------------------------------------------------------------- cross-GPU


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
    head, head_header, head_fmt, head_better = (("gbps_full", "GB/s", lambda v: f"{v:,.0f}", "high") if kernel else
                                                ("tokens_per_s", "tokens/s", lambda v: f"{v:,.0f}", "high"))
    merged: Dict[str, Dict[str, Any]] = {}
    for slug in slugs:
        for e in tables[slug]:
            line = merged.setdefault(e["point_key"], {"point_key": e["point_key"], "name": e.get("opt", e.get("impl")),
                                                      "group": e.get("group", e.get("setting")), "status": "ok"})
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
    columns += [Column(f"ratio@{s}", f"{s} / {slugs[0]}", _num(f"ratio@{s}", lambda v: f"{v:.2f}×"), "high")
                for s in slugs[1:]]
    return list(merged.values()), columns, head, head_header


def write_cross_gpu(per_gpu: Dict[str, List[Run]], out_root: Path, baseline_opt: Optional[str] = None,
                    formats: Sequence[str] = ("png", "pdf")) -> Path:
    """reports/cross-gpu/<suite>/: one table and one figure with the GPU kind as an axis."""
    from optkit import plots

    suite = next(iter(per_gpu.values()))[0].suite
    out_dir = Path(out_root) / "cross-gpu" / suite
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    entries, columns, head, head_header = cross_gpu_table(per_gpu, baseline_opt)
    slugs = list(per_gpu)
    md = [f"# optkit report: suite `{suite}` across GPUs ({', '.join(slugs)})", ""]
    for slug, runs in per_gpu.items():
        md += [f"### {slug}", "", environment_block(runs), ""]
    md += ["## Side by side", "", write_tables(out_dir, "cross_gpu", columns, entries, "group"), ""]
    labels = [e["label"] for e in entries]
    panels = [(head_header, {s: [e.get(f"{head}@{s}") for e in entries] for s in slugs}),
              (f"speedup vs {KERNEL_BASELINE_IMPL if head == 'gbps_full' else 'baseline'}",
               {s: [e.get(f"speedup@{s}") for e in entries] for s in slugs})]
    md += FigureWriter(out_dir, formats)(plots.cross_gpu_bars, labels, panels, f"{suite}: {' vs '.join(slugs)}",
                                         name="cross_gpu", caption="cross-GPU")
    (out_dir / "report.md").write_text("\n".join(md).rstrip() + "\n")
    return out_dir / "report.md"


def newest_run(runs: Sequence[Run]) -> Run:
    """The last run by run id (ids default to UTC timestamps); says which ones it leaves out."""
    ordered = sorted(runs, key=lambda r: natural_key(r.run_id))
    if len(ordered) > 1:
        print(f"optkit report: {ordered[-1].gpu_slug}/{ordered[-1].suite}: reporting the newest run "
              f"{ordered[-1].run_id}, not {', '.join(r.run_id for r in ordered[:-1])} (--merge pools them)",
              file=sys.stderr)
    return ordered[-1]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="optkit report", description="tables and plots from result runs")
    parser.add_argument("run_dirs", nargs="+", help="results/<gpu>/<suite>/<run_id> directories")
    parser.add_argument("--out", default="reports", help="output root (default: reports)")
    parser.add_argument("--baseline-opt", default=None, help="opt-set speedups are computed against "
                        "(default: the rows' suite.baseline_opt, else 'baseline')")
    parser.add_argument("--formats", default="png,pdf", help="figure formats, comma-separated (default: png,pdf)")
    parser.add_argument("--merge", action="store_true", help="pool runs of one GPU kind and suite (their rows of a "
                        "point become extra measurement windows); default: report the newest run of each")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(d) for d in args.run_dirs]
    except ReportInputError as exc:
        print(f"optkit report: {exc}", file=sys.stderr)
        return 2
    formats = tuple(f.strip().lstrip(".") for f in args.formats.split(",") if f.strip())
    groups: Dict[tuple, List[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.gpu_slug, run.suite)].append(run)
    if not args.merge:
        groups = {key: [newest_run(group)] for key, group in groups.items()}
    for group_runs in groups.values():
        print(write_report(group_runs, Path(args.out), args.baseline_opt, formats))
    by_suite: Dict[str, Dict[str, List[Run]]] = defaultdict(dict)
    for (slug, suite), group_runs in groups.items():
        by_suite[suite][slug] = group_runs
    for per_gpu in by_suite.values():
        if len(per_gpu) > 1:
            print(write_cross_gpu(per_gpu, Path(args.out), args.baseline_opt, formats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
