"""Kernel rows -> the text table the kernels suite prints: one line per row, "x eager" (eager's
full_ms over the row's), share of copy bandwidth by event time and by device time, and flags
(noisy, THROTTLED, LAUNCH-BOUND, NO-DEVICE-TIME, DEVICE>EVENTS, TFLOP/s of compute-bound ops). A forward-only op's
rows (nf4_dequantize: optkit, eager = optkit's PyTorch reference, bitsandbytes) show "-" for bwd ms.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

from optkit.bench.kernels.rows import DEVICE_OFF_REASON, NO_DEVICE_TIME_REASON

DEVICE_OVER_EVENTS_TOLERANCE = 1.1  # full_device_ms above this x full_ms is flagged in the table


def _fmt_ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_pct(fraction: Optional[float]) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def _flags(r: Dict[str, Any]) -> str:
    flags = "".join(
        f" {flag}"
        for flag, on in (
            ("noisy", r.get("full_ms_noisy")),
            ("THROTTLED", r.get("throttled")),
            ("LAUNCH-BOUND", r.get("launch_bound")),
        )
        if on
    )
    expected_none = (None, NO_DEVICE_TIME_REASON, DEVICE_OFF_REASON)
    if r.get("full_device_ms") is None and r.get("device_error") not in expected_none:
        flags += " NO-DEVICE-TIME"
    # The kernels cannot run longer than the event window around them: if they seem to, the trace
    # attributed work that is not the op's (a self-check of the device pass; 10% for repeat noise).
    if r.get("full_device_ms") and r["full_device_ms"] > DEVICE_OVER_EVENTS_TOLERANCE * r["full_ms"]:
        flags += " DEVICE>EVENTS"
    if r.get("tflops_full"):  # compute-bound op: GB/s is not its measure
        flags += f" {r['tflops_full']:.0f} TFLOP/s"
    return flags


TABLE_NOTES = (
    "full ms: CUDA events around forward+backward (launch gaps included); p10-p90 of it; x eager: eager's full ms / "
    "the row's\ndev ms: profiler time of the op's kernels, memcpys and memsets alone (median); kern: their number; "
    "%copy ev / dev: bytes_full over full ms / dev ms, as a share of copy bandwidth\n"
    "graph ms: CUDA events around one CUDA-graph replay of forward+backward (no host launch cost)\n"
    "flags: noisy (IQR > 10% of median), THROTTLED, LAUNCH-BOUND (full ms >= 1.25 x graph ms), "
    "NO-DEVICE-TIME (see the row's device_error), "
    "DEVICE>EVENTS (dev ms > 1.1 x full ms: the device pass misattributed work)"
)


def format_table(rows: Iterable[Dict[str, Any]]) -> str:
    """One line per row (rows come grouped by case); "x eager" is eager's full_ms over the row's."""
    rows = list(rows)
    eager_full = {
        (r["op"], r["shape"], r["dtype"]): r["full_ms"] for r in rows if r["impl"] == "eager" and r["status"] == "ok"
    }
    header = (
        f"{'op':<27} {'shape':<34} {'dtype':<8} {'impl':<12} {'fwd ms':>9} {'bwd ms':>9} {'full ms':>9} "
        f"{'p10-p90':>17} {'x eager':>7} {'%copy ev':>8} {'graph ms':>9} {'dev ms':>9} {'kern':>5} {'%copy dev':>9} "
        f"{'dpeak MiB':>10}  status"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        label = f"{r['op']:<27} {r['shape']:<34} {r['dtype']:<8} {r['impl']:<12}"
        if r["status"] != "ok":
            reason = (r["error"] or "").splitlines()[0][:80] if r["error"] else ""
            lines.append(f"{label} {r['status']}: {reason}")
            continue
        base = eager_full.get((r["op"], r["shape"], r["dtype"]))
        speedup = f"{base / r['full_ms']:.2f}" if base else "-"
        star = "*" if r["loss_in_forward"] else " "
        spread = f"{r['full_ms_p10']:.3f}-{r['full_ms_p90']:.3f}"
        kernels = "-" if r.get("n_kernels_full") is None else str(r["n_kernels_full"])
        peak = "-" if r["peak_delta_bytes"] is None else f"{r['peak_delta_bytes'] / 2**20:.1f}"
        lines.append(
            f"{label} {_fmt_ms(r['fwd_ms']):>8}{star} {_fmt_ms(r['bwd_ms']):>8}{star} "
            f"{_fmt_ms(r['full_ms']):>9} {spread:>17} {speedup:>7} {_fmt_pct(r['frac_of_copy']):>8} "
            f"{_fmt_ms(r.get('graph_ms')):>9} "
            f"{_fmt_ms(r.get('full_device_ms')):>9} {kernels:>5} {_fmt_pct(r.get('frac_of_copy_device')):>9} "
            f"{peak:>10}  ok{_flags(r)}"
        )
    if any(r["status"] == "ok" for r in rows):
        lines.append(TABLE_NOTES)
    if any(r.get("loss_in_forward") and r["status"] == "ok" for r in rows):
        lines.append("* gradient computed in forward (fused loss): compare these rows on full ms / dev ms only")
    if any(r.get("forward_only") and r["status"] == "ok" for r in rows):
        lines.append(
            "forward-only ops ("
            + ", ".join(sorted({r["op"] for r in rows if r.get("forward_only")}))
            + "): no backward, so full ms and dev ms are the forward's and bwd ms is -"
        )
    return "\n".join(lines)
