"""The report's headline: per setting, every opt-set's tokens/s with a CI over processes (report/headline_stats.py),
its ratio to the baseline and to the strongest peer, its memory (timed, whole process, allocator), its final
loss, the precision its LoRA math runs in, and one verdict line per optkit opt-set against the strongest peer.

Written only for runs whose points were measured in several processes (bench.isolate_repeats /
bench.interleave, as suites e2e and qlora_stack do); a run of one process per point has no spread between
processes to show, and its report stays as it was.
"""

from __future__ import annotations

from statistics import median
from typing import Any, Dict, List, Optional, Sequence

from optkit.report.headline_stats import geometric_mean_ci, process_figures, ratio_ci
from optkit.results.runs import Point, setting_of

GIB = 1024**3
DASH = "—"
# Registry entries with peer=True (optkit/opt/registry.py; a test keeps the two equal). A point whose
# requested optimizations are all peers' is a peer's point.
PEER_SWITCHES = ("liger", "compile", "unsloth")
_SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
MEMORY = (
    ("peak_nvml_timed_device_bytes", "timed"),
    ("peak_nvml_device_bytes", "whole process"),
    ("peak_allocated_bytes", "allocated"),
)


def is_peer(point: Point) -> bool:
    requested = point.head.get("requested_optimizations") or []
    return bool(requested) and all(name in PEER_SWITCHES for name in requested)


def is_optkit(point: Point) -> bool:
    return any(name not in PEER_SWITCHES for name in point.head.get("requested_optimizations") or [])


def lora_math(head: Dict[str, Any]) -> str:
    """The precision a row's LoRA math runs in, and its adapter weights' when they differ."""
    if head.get("train_method") not in ("lora", "qlora"):
        return DASH
    opt = (head.get("config") or {}).get("opt") or {}
    weights = head.get("lora_adapter_dtype") or (
        "float32" if opt.get("adapter_dtype", "float32") == "float32" else head.get("dtype")
    )
    short = _SHORT_DTYPE.get(str(weights), str(weights))
    if opt.get("unsloth"):
        return f"Unsloth's ({short} weights)"
    if "fused_lora" in (head.get("applied_optimizations") or []):
        math_dtype = _SHORT_DTYPE.get(str(head.get("dtype")), str(head.get("dtype")))
        return math_dtype if math_dtype == short else f"{math_dtype} ({short} weights)"
    return short


def _median_of(point: Point, field: str) -> Optional[float]:
    values = [r[field] for r in point.ok if isinstance(r.get(field), (int, float))]
    return median(values) if values else None


def _final_loss(point: Point) -> Optional[float]:
    return _median_of(point, "loss_last")


def _ci_text(estimate, low, high, fmt) -> str:
    if estimate is None:
        return DASH
    return fmt(estimate) if low is None else f"{fmt(estimate)} [{fmt(low)}, {fmt(high)}]"


def _ratio(estimate, low, high) -> str:
    return _ci_text(estimate, low, high, lambda v: f"{v:.2f}×")


def _gib(value: Optional[float]) -> str:
    return DASH if value is None else f"{value / GIB:.2f}"


def _tokens(point: Point) -> List[float]:
    return [f.tokens_per_s for f in process_figures(point.rows)]


def verdict(point: Point, peer: Point) -> str:
    """One line: faster / slower / a tie against ``peer`` by the CI over processes, and leaner or not."""
    ratio, low, high = ratio_ci(_tokens(point), _tokens(peer))
    if ratio is None:
        return f"`{point.head.get('opt')}` vs `{peer.head.get('opt')}`: no throughput to compare"
    if low is None:
        speed = "no CI (one process on a side)"
    elif low > 1.0:
        speed = "faster (the CI excludes a tie)"
    elif high < 1.0:
        speed = "slower (the CI excludes a tie)"
    else:
        speed = "a tie within the CI"
    parts = [f"`{point.head.get('opt')}` vs `{peer.head.get('opt')}`: {_ratio(ratio, low, high)} tokens/s, {speed}"]
    for field, label in MEMORY:
        mine, theirs = _median_of(point, field), _median_of(peer, field)
        if mine is not None and theirs is not None:
            word = "leaner" if mine < theirs else "heavier" if mine > theirs else "equal"
            parts.append(f"{label} {_gib(mine)} vs {_gib(theirs)} GiB ({word})")
    return "; ".join(parts)


def setting_lines(points: Sequence[Point], baseline_opt: str) -> List[str]:
    """The headline table of one setting, and the verdicts against its strongest peer."""
    by_tokens = {p.key: geometric_mean_ci(_tokens(p)) for p in points}
    base = next((p for p in points if p.head.get("opt") == baseline_opt and p.ok), None)
    peers = [p for p in points if is_peer(p) and by_tokens[p.key][0]]
    strongest = max(peers, key=lambda p: by_tokens[p.key][0], default=None)
    lines = [
        "| opt-set | LoRA math | processes (windows) | tokens/s [95% CI] | vs baseline | vs "
        + (f"`{strongest.head.get('opt')}`" if strongest else "strongest peer")
        + " | peak NVML timed GiB | peak NVML GiB | peak allocated GiB | final loss |",
        "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        figures = process_figures(p.rows)
        vs_base = _ratio(*ratio_ci(_tokens(p), _tokens(base))) if base is not None and p is not base else DASH
        vs_peer = _ratio(*ratio_ci(_tokens(p), _tokens(strongest))) if strongest and p is not strongest else DASH
        status = "" if p.ok else f" ({p.status})"
        loss = _final_loss(p)
        memory = " | ".join(_gib(_median_of(p, field)) for field, _ in MEMORY)
        lines.append(
            f"| {p.head.get('opt')}{status} | {lora_math(p.head)} | {len(figures)} ({len(p.ok)}) | "
            f"{_ci_text(*by_tokens[p.key], lambda v: f'{v:,.0f}')} | {vs_base} | {vs_peer} | {memory} | "
            f"{DASH if loss is None else f'{loss:.4f}'} |"
        )
    lines.append("")
    if strongest is not None:
        lines += [f"Strongest peer by tokens/s: `{strongest.head.get('opt')}`.", ""]
        verdicts = [f"- {verdict(p, strongest)}" for p in points if is_optkit(p) and p.ok]
        lines += verdicts + ([""] if verdicts else [])
    return lines


def headline_lines(points: Sequence[Point], baseline_opt: str) -> List[str]:
    """The headline section, or [] when no point was measured in more than one process."""
    train = [p for p in points if p.kind == "train"]
    if not any(len(process_figures(p.rows)) > 1 for p in train):
        return []
    md = [
        "## Headline: spread over processes",
        "",
        "Each opt-set ran in several processes (interleaved when `bench.interleave=true`: A B C A B C ...). "
        "tokens/s: geometric mean over processes with a 95% Student t interval over processes; a process's "
        "tokens/s comes from the median of its windows' median step times (windows of one process share its "
        "state, so they are not counted as replicates). Ratios: Welch t interval on log tokens/s. Memory and "
        "loss: medians over processes. The per-model tables below bootstrap steps within windows instead.",
        "",
    ]
    by_setting: Dict[str, List[Point]] = {}
    for p in train:
        by_setting.setdefault(setting_of(p), []).append(p)
    for setting, group in by_setting.items():
        md += [f"### `{setting}`", ""] + setting_lines(group, baseline_opt)
    return md
