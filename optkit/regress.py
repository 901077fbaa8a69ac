"""Regression gate: compare a candidate run with a baseline run of the same GPU kind.

``optkit regress --baseline DIR --candidate DIR [--threshold 0.05] [--mem-threshold 0.05]
[--markdown out.md]`` matches points by point key (kernel rows: op/impl/dtype/shape) and judges
each metric in its own direction: tokens/s higher is better; step and kernel times, peak memory
lower is better. A change is a *regression* only when both hold:
- the ratio is beyond the threshold (worse by more than ``threshold``), and
- the evidence says it is not noise: Mann-Whitney U p < alpha on the per-step samples AND the 95%
  bootstrap CI of the ratio of medians excludes 1 (asv gates on a factor plus Mann-Whitney).
  Memory peaks are single counters per window: the allocator's is exact for the same program, so
  the ratio alone decides; with several windows on both sides their ranges must not overlap.
With fewer than ``min_samples`` per side a change beyond the threshold is "insufficient data",
never a guess. A point that was ok and now fails (oom, error...) is a regression.

The gate also fails (one line per cause) on what would let a regression slip through unseen:
- a baseline point missing from the candidate (``--allow-missing [N]`` lets N, or any, through);
- a line of the candidate's results.jsonl that holds no row, e.g. torn by a kill mid-write: the point
  written there is lost (``--allow-bad-lines [N]``);
- a candidate row whose stored tokens/s disagrees with tokens_per_step / its median step time by more
  than TOKENS_PER_S_RTOL: an edited row or a broken writer (no allowance: remeasure).
The same findings in the baseline are warnings.

Exit codes: 1 a regression or a gate failure, 0 neither, 2 unusable input (missing files, corrupt
env.json, no valid row, different GPU kinds, no common points). A different software stack (driver,
torch, ...) is a warning, or an error with ``--strict-env``: the gate then measures the stack change too.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from optkit.measure.stats import mann_whitney_p, pooled_median, ratio_ci
from optkit.report.run_checks import (
    TOKENS_PER_S_RTOL,
    bad_lines,
    check_inputs,
    describe,
    listed,
    load_checked,
    tokens_per_s_mismatches,
)
from optkit.report.tables import DASH, GIB, sig
from optkit.results.runs import Point, ReportInputError, Run, group_points

MIN_SAMPLES = 6  # smallest n per side at which Mann-Whitney can reach p < 0.01 (normal approximation)
ALPHA = 0.01
PROG = "optkit regress"


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "train" | "kernel": which rows carry it
    better: str  # "high" | "low"
    memory: bool  # judged against --mem-threshold, as an exact counter
    groups: Callable[[Point], List[List[float]]]  # samples per measurement window
    fmt: Callable[[float], str]


def _field_groups(field: str) -> Callable[[Point], List[List[float]]]:
    return lambda p: p.samples(field)


def _tokens_per_s_groups(point: Point) -> List[List[float]]:
    tokens = point.median("tokens_per_step")
    if not tokens:
        return [[r["tokens_per_s"]] for r in point.ok if r.get("tokens_per_s")]
    return [[tokens * 1e3 / t for t in r["step_times_ms"] if t] for r in point.ok if r.get("step_times_ms")]


def _counter_groups(*fields: str) -> Callable[[Point], List[List[float]]]:
    """One value per window: the first of ``fields`` the row has (NVML: process, else device)."""

    def groups(point: Point) -> List[List[float]]:
        out = []
        for row in point.ok:
            value = next((row[f] for f in fields if row.get(f) is not None), None)
            if value is not None:
                out.append([float(value)])
        return out

    return groups


def _gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


METRICS = (
    Metric("tokens_per_s", "train", "high", False, _tokens_per_s_groups, lambda v: f"{v:,.0f}"),
    Metric("step_ms", "train", "low", False, _field_groups("step_times_ms"), sig),
    Metric("peak_allocated_bytes", "train", "low", True, _counter_groups("peak_allocated_bytes"), _gib),
    Metric(
        "peak_nvml_bytes",
        "train",
        "low",
        True,
        _counter_groups("peak_nvml_process_bytes", "peak_nvml_device_bytes"),
        _gib,
    ),
    Metric("full_ms", "kernel", "low", False, _field_groups("full_times_ms"), sig),
    Metric("peak_delta_bytes", "kernel", "low", True, _counter_groups("peak_delta_bytes"), _gib),
)


@dataclass
class Comparison:
    point: str
    metric: str
    verdict: str  # regression | improvement | unchanged | noise | insufficient data
    baseline: str = DASH
    candidate: str = DASH
    change: Optional[float] = None  # candidate / baseline - 1
    ci: Optional[tuple] = None  # 95% CI of candidate / baseline
    p_value: Optional[float] = None
    evidence: str = ""


@dataclass
class Thresholds:
    time: float = 0.05
    memory: float = 0.05
    alpha: float = ALPHA
    min_samples: int = MIN_SAMPLES


def _worse_factor(base: float, cand: float, better: str) -> float:
    """> 1: the candidate is worse by that factor, in the metric's own direction."""
    lower, higher = (cand, base) if better == "low" else (base, cand)
    if higher == 0:
        return 1.0 if lower == 0 else float("inf")
    return lower / higher


def judge(
    base_groups: Sequence[Sequence[float]],
    cand_groups: Sequence[Sequence[float]],
    better: str,
    threshold: float,
    memory: bool,
    limits: Thresholds,
) -> Optional[dict]:
    """Verdict of one metric at one point; None when either side has no value."""
    base, cand = pooled_median(base_groups), pooled_median(cand_groups)
    if base is None or cand is None:
        return None
    out = {"base": base, "cand": cand, "change": cand / base - 1.0 if base else None, "ci": None, "p": None}
    worse = _worse_factor(base, cand, better)
    direction = "regression" if worse > 1.0 + threshold else "improvement" if worse < 1.0 / (1.0 + threshold) else None
    if direction is None:
        return {**out, "verdict": "unchanged", "evidence": f"within {threshold:.0%}"}
    if memory:
        return {**out, **_judge_counter(base_groups, cand_groups, direction, better)}
    n_base, n_cand = sum(len(g) for g in base_groups), sum(len(g) for g in cand_groups)
    if min(n_base, n_cand) < limits.min_samples:
        return {
            **out,
            "verdict": "insufficient data",
            "evidence": f"{n_base} vs {n_cand} samples (< {limits.min_samples} per side)",
        }
    ratio, low, high = ratio_ci(cand_groups, base_groups)
    p = mann_whitney_p([v for g in base_groups for v in g], [v for g in cand_groups for v in g])
    out.update(ci=(low, high), p=p)
    significant = p is not None and p < limits.alpha and (low > 1.0 or high < 1.0)
    if not significant:
        return {
            **out,
            "verdict": "noise",
            "evidence": f"not significant (p={_p(p)}; needs p < {limits.alpha} and a CI excluding 1)",
        }
    return {**out, "verdict": direction, "evidence": f"Mann-Whitney p={_p(p)}, CI excludes 1"}


def _judge_counter(base_groups, cand_groups, direction: str, better: str) -> dict:
    if len(base_groups) < 2 or len(cand_groups) < 2:
        return {"verdict": direction, "evidence": "exact counter"}
    base_vals, cand_vals = [g[0] for g in base_groups], [g[0] for g in cand_groups]
    cand_higher = min(cand_vals) > max(base_vals)
    separated = cand_higher or max(cand_vals) < min(base_vals)
    if not separated:
        return {"verdict": "noise", "evidence": "ranges over windows overlap"}
    return {"verdict": direction, "evidence": f"ranges over {len(base_vals)}+{len(cand_vals)} windows apart"}


def _p(p: Optional[float]) -> str:
    return DASH if p is None else f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def compare_points(base: Point, cand: Point, limits: Thresholds) -> List[Comparison]:
    if base.ok and not cand.ok:
        return [Comparison(base.key, "status", "regression", "ok", cand.status, evidence=cand.errors()[0])]
    if cand.ok and not base.ok:
        return [Comparison(base.key, "status", "improvement", base.status, "ok")]
    if not base.ok:
        return [Comparison(base.key, "status", "unchanged", base.status, cand.status, evidence="failed in both")]
    out = []
    for metric in (m for m in METRICS if m.kind == base.kind):
        threshold = limits.memory if metric.memory else limits.time
        result = judge(metric.groups(base), metric.groups(cand), metric.better, threshold, metric.memory, limits)
        if result is None:
            continue
        out.append(
            Comparison(
                base.key,
                metric.name,
                result["verdict"],
                metric.fmt(result["base"]),
                metric.fmt(result["cand"]),
                result["change"],
                result["ci"],
                result["p"],
                result["evidence"],
            )
        )
    return out


@dataclass
class Allowances:
    """How many missing points / rowless candidate lines the user lets through (None: any)."""

    missing: Optional[int] = 0
    bad_lines: Optional[int] = 0


def _exceeds(count: int, allowed: Optional[int]) -> bool:
    return allowed is not None and count > allowed


def gate_failures(candidate: Run, missing: List[str], allow: Allowances, warnings: List[str]) -> List[str]:
    """One line per cause that fails the gate besides a regression; what an allowance lets through is
    added to ``warnings``."""
    failures = []
    rowless = bad_lines(candidate.path / "results.jsonl")
    if rowless and not _exceeds(len(rowless), allow.bad_lines):
        warnings.append(f"candidate (allowed by --allow-bad-lines): {describe(rowless)}")
    elif rowless:
        failures.append(
            f"candidate: {describe(rowless)}; a point written there is lost: measure it again, or pass "
            f"--allow-bad-lines {len(rowless)}"
        )
    if _exceeds(len(missing), allow.missing):
        failures.append(
            f"{len(missing)} baseline point(s) missing in the candidate: {listed([f'`{k}`' for k in missing])}; "
            f"measure them (bench.resume=<run>), or pass --allow-missing {len(missing)}"
        )
    mismatches = tokens_per_s_mismatches(candidate)
    if mismatches:
        failures.append(
            f"{len(mismatches)} candidate row(s) whose tokens_per_s disagrees with tokens_per_step / median step "
            f"time by more than {TOKENS_PER_S_RTOL:.1%}: {listed(mismatches, 3)}; an edited row or a broken "
            "writer: measure it again"
        )
    return failures


def baseline_warnings(baseline: Run) -> List[str]:
    out = []
    rowless = bad_lines(baseline.path / "results.jsonl")
    if rowless:
        out.append(f"baseline: {describe(rowless)}")
    mismatches = tokens_per_s_mismatches(baseline)
    if mismatches:
        out.append(f"baseline rows whose tokens_per_s disagrees with their step times: {listed(mismatches, 3)}")
    return out


SECTIONS = (
    ("regression", "Regressions"),
    ("improvement", "Improvements"),
    ("insufficient data", "Insufficient data (beyond the threshold, too few samples to tell)"),
    ("noise", "Beyond the threshold but within noise"),
    ("unchanged", "Unchanged"),
)


def _row(c: Comparison) -> str:
    change = DASH if c.change is None else f"{100 * c.change:+.1f}%"
    ci = DASH if not c.ci or c.ci[0] is None else f"[{c.ci[0]:.3f}, {c.ci[1]:.3f}]"
    return (
        f"| `{c.point}` | {c.metric} | {c.baseline} | {c.candidate} | {change} | {ci} | {_p(c.p_value)} | "
        f"{c.evidence.replace('|', '/')} |"
    )


def render(
    baseline: Run,
    candidate: Run,
    comparisons: List[Comparison],
    missing: List[str],
    new: List[str],
    warnings: List[str],
    limits: Thresholds,
    failures: Sequence[str] = (),
) -> str:
    regressions = [c for c in comparisons if c.verdict == "regression"]
    head = "REGRESSION" if regressions else "FAIL" if failures else "OK"
    lines = [
        f"# optkit regress: {head}",
        "",
        f"- GPU: `{candidate.gpu_slug}` ({candidate.value('gpu_name') or 'CPU'})",
        f"- baseline: `{baseline.run_id}` (git `{baseline.value('git_sha')}`), {baseline.path}",
        f"- candidate: `{candidate.run_id}` (git `{candidate.value('git_sha')}`), {candidate.path}",
        f"- thresholds: time {limits.time:.0%}, memory {limits.memory:.0%}; evidence: Mann-Whitney "
        f"p < {limits.alpha} and 95% CI of the ratio excluding 1; at least {limits.min_samples} samples per side",
    ]
    lines += [f"- warning: {w}" for w in warnings] + [""]
    if failures:
        lines += [f"## Gate failures ({len(failures)})", ""] + [f"- {f}" for f in failures] + [""]
    header = [
        "| point | metric | baseline | candidate | change | 95% CI cand/base | p | evidence |",
        "|:---|:---|---:|---:|---:|---:|---:|:---|",
    ]
    for verdict, title in SECTIONS:
        chosen = [c for c in comparisons if c.verdict == verdict]
        if not chosen:
            continue
        table = [f"## {title} ({len(chosen)})", ""] + header + [_row(c) for c in chosen] + [""]
        if verdict == "unchanged":
            table = ["<details><summary>" + table[0][3:] + "</summary>", ""] + table[2:] + ["</details>", ""]
        lines += table
    if missing or new:
        lines += [f"## Points not in both runs ({len(missing) + len(new)})", ""]
        lines += [f"- missing in candidate: `{k}`" for k in missing] + [f"- only in candidate: `{k}`" for k in new]
        lines.append("")
    counts = {v: sum(c.verdict == v for c in comparisons) for v, _ in SECTIONS}
    lines.append(
        "Summary: "
        + ", ".join(f"{n} {v}" for v, n in counts.items())
        + f", {len(missing)} missing in candidate, {len(new)} only in candidate, {len(failures)} gate failure(s)."
    )
    return "\n".join(lines) + "\n"


def regress(
    baseline_dir, candidate_dir, limits: Thresholds, strict_env: bool = False, allow: Allowances = Allowances()
) -> tuple:
    """(exit code, markdown, gate failures). Raises ReportInputError on unusable input."""
    baseline, candidate = load_checked(baseline_dir, PROG), load_checked(candidate_dir, PROG)
    warnings = check_inputs(baseline, candidate, strict_env) + baseline_warnings(baseline)
    base_points = {p.key: p for p in group_points(baseline.rows)}
    cand_points = {p.key: p for p in group_points(candidate.rows)}
    common = [k for k in base_points if k in cand_points]
    if not common:
        raise ReportInputError(
            f"no point of {candidate.path} matches one of {baseline.path} (e.g. baseline "
            f"'{next(iter(base_points))}'): compare runs of the same suite"
        )
    comparisons = [c for k in common for c in compare_points(base_points[k], cand_points[k], limits)]
    missing = [k for k in base_points if k not in cand_points]
    new = [k for k in cand_points if k not in base_points]
    failures = gate_failures(candidate, missing, allow, warnings)
    markdown = render(baseline, candidate, comparisons, missing, new, warnings, limits, failures)
    failed = failures or any(c.verdict == "regression" for c in comparisons)
    return (1 if failed else 0), markdown, failures


def _allowance(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: give a count >= 0, or the flag alone for any number")
    return value


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="run directory results/<gpu>/<suite>/<run_id>")
    parser.add_argument("--candidate", required=True, help="run directory to judge")
    parser.add_argument("--threshold", type=float, default=0.05, help="time/throughput: worse by more than this")
    parser.add_argument("--mem-threshold", type=float, default=0.05, help="peak memory: worse by more than this")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="Mann-Whitney significance level")
    parser.add_argument("--min-samples", type=int, default=MIN_SAMPLES, help="fewer per side: insufficient data")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the report here (CI summary)")
    parser.add_argument("--strict-env", action="store_true", help="a different software stack is an error (exit 2)")
    for flag, what in (
        ("missing", "baseline points missing in the candidate"),
        ("bad-lines", "candidate lines that hold no row (torn, not an object)"),
    ):
        parser.add_argument(
            f"--allow-{flag}",
            type=_allowance,
            nargs="?",
            const=None,
            default=0,
            metavar="N",
            help=f"pass with up to N {what} (the flag alone: any number; default 0)",
        )
    args = parser.parse_args(argv)
    limits = Thresholds(args.threshold, args.mem_threshold, args.alpha, args.min_samples)
    try:
        code, markdown, failures = regress(
            args.baseline, args.candidate, limits, args.strict_env, Allowances(args.allow_missing, args.allow_bad_lines)
        )
    except ReportInputError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    print(markdown)
    for failure in failures:
        print(f"{PROG}: FAIL: {failure}", file=sys.stderr)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown)
    return code


if __name__ == "__main__":
    sys.exit(main())
