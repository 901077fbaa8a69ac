"""Reports, step 2: points -> table entries (plain dicts of raw values), one per point.

Definitions the tables use:
- speedup: tokens/s of an opt-set over tokens/s of the suite's baseline opt-set (``opt ==
  suite.baseline_opt``, default "baseline") at the same point (key minus model and opt). Its 95% CI
  is a bootstrap of the ratio of median step times (measure.stats.ratio_ci: steps resampled within each
  measurement window, windows resampled when there are repeats). Kernels: vs the eager impl.
- peak NVML: this process's peak when NVML could see it, else device-wide (marked *); peak NVML
  timed: device-wide, over the timed steps only (not the model build).
- mem saving: 1 - peak / baseline's peak, on the first of these both points have: peak NVML timed (what
  training holds; a QLoRA build materializes the bf16 model before quantizing it, which would otherwise
  set every QLoRA row's peak), peak NVML, the allocator peak. ``mem_saving_source`` names the one used.
A point that failed (oom, error, skipped, timeout) keeps its entry, with its status and error.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from optkit.measure.stats import pooled_median, ratio_ci
from optkit.results.runs import Point, natural_key, setting_of

KERNEL_BASELINE_IMPL = "eager"


def _scaled_ratio(num: Point, den: Point, field: str, scale: float = 1.0):
    """ratio of pooled medians (num / den) x scale, with its bootstrap CI; Nones without samples."""
    ratio, low, high = ratio_ci(num.samples(field), den.samples(field))
    if ratio is None:
        return None, None, None
    return ratio * scale, low * scale, high * scale


def train_entry(point: Point, base: Optional[Point]) -> Dict[str, Any]:
    head = point.head
    entry = {k: head.get(k) for k in ("model", "opt", "batch_size", "seq_len", "train_method", "loss_in_forward")}
    entry.update(
        point_key=point.key,
        setting=setting_of(point),
        status=point.status,
        windows=len(point.ok),
        steps=sum(len(s) for s in point.samples("step_times_ms")),
        error="; ".join(point.errors()) or None,
        traces=[(r["_run_dir"], r["trace_path"]) for r in point.rows if r.get("trace_path")],
    )
    if point.ok:
        step_ms = pooled_median(point.samples("step_times_ms")) or point.median("step_ms")
        tokens = point.median("tokens_per_step")
        nvml_process = point.median("peak_nvml_process_bytes")
        nvml = nvml_process if nvml_process is not None else point.median("peak_nvml_device_bytes")
        entry.update(
            step_ms=step_ms,
            tokens_per_s=tokens * 1e3 / step_ms if tokens and step_ms else point.median("tokens_per_s"),
            mfu=point.median("mfu"),
            forward_ms=point.median("forward_ms"),
            backward_ms=point.median("backward_ms"),
            optimizer_ms=point.median("optimizer_ms"),
            peak_nvml_bytes=nvml,
            peak_nvml_source="process" if nvml_process is not None else "device",
            peak_allocated_bytes=point.median("peak_allocated_bytes"),
            peak_nvml_timed_bytes=point.median("peak_nvml_timed_device_bytes"),
            noisy=any(r.get("step_ms_noisy") for r in point.ok),
        )
        for field in ("energy_j_per_token", "avg_power_w"):  # rows before these fields: no (empty) CSV column
            if point.median(field) is not None:
                entry[field] = point.median(field)
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
    for field in ("peak_nvml_timed_bytes", "peak_nvml_bytes", "peak_allocated_bytes"):
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
            entry.update(
                full_ms=full_ms,
                full_ms_p10=p.median("full_ms_p10"),
                full_ms_p90=p.median("full_ms_p90"),
                fwd_ms=p.median("fwd_ms"),
                bwd_ms=p.median("bwd_ms"),
                bytes_full=nbytes,
                gbps_full=nbytes / (full_ms * 1e-3) / 1e9 if nbytes and full_ms else p.median("gbps_full"),
                copy_gbps=p.median("copy_gbps"),
                peak_delta_bytes=p.median("peak_delta_bytes"),
                tflops_full=p.median("tflops_full"),
                noisy=any(r.get("full_ms_noisy") for r in p.ok),
                throttled=any(r.get("throttled") for r in p.ok),
            )
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
