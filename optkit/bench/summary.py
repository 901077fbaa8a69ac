"""The table printed at the end of a sweep: tokens/s, step split, peak memory, speedup vs baseline.

The publication tables are report.py's job; this one is for the terminal, right after a run.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Iterable, List

GIB = 1024**3


def summary_lines(rows: Iterable[Dict[str, Any]], baseline_opt: str = "baseline") -> List[str]:
    rows = list(rows)
    baseline_tps = {
        r["setting_key"]: r["tokens_per_s"]
        for r in rows
        if r.get("status") == "ok" and r.get("opt") == baseline_opt and r.get("tokens_per_s")
    }
    header = (
        f"{'model':<18} {'opt':<26} {'b x seq':>10} {'status':<8} {'tok/s':>11} {'speedup':>8} "
        f"{'fwd/bwd/opt ms':>22} {'peak GiB':>9} {'MFU':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = f"{r.get('batch_size')}x{r.get('seq_len')}"
        if r.get("status") != "ok":
            reason = (r.get("error") or "").splitlines()[0][:60] if r.get("error") else ""
            lines.append(f"{str(r.get('model')):<18} {str(r.get('opt')):<26} {shape:>10} {r.get('status'):<8} {reason}")
            continue
        base = baseline_tps.get(r.get("setting_key"))
        speedup = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        split = "/".join(f"{r.get(k) or 0:.1f}" for k in ("forward_ms", "backward_ms", "optimizer_ms"))
        peak = r.get("peak_nvml_device_bytes") or r.get("peak_reserved_bytes") or r.get("peak_rss_bytes")
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        lines.append(
            f"{r['model']:<18} {r['opt']:<26} {shape:>10} {'ok':<8} {r['tokens_per_s']:>11,.0f} "
            f"{speedup:>8} {split:>22} {(peak or 0) / GIB:>9.2f} {mfu:>6}"
        )
    lines.append("peak GiB: NVML device-wide on a GPU, else the allocator's reserved, else host peak RSS (CPU)")
    if any(r.get("device") == "cpu" for r in rows):
        lines.append(
            "CPU: optkit's Triton kernels run under Triton's interpreter here, so their speed says nothing; "
            "this run checks the pipeline, a GPU run measures"
        )
    return lines


def print_summary(rows: Iterable[Dict[str, Any]], baseline_opt: str = "baseline", file=None) -> None:
    print("\n".join(summary_lines(rows, baseline_opt)), file=file or sys.stdout, flush=True)
