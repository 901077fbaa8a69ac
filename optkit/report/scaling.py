"""Reports: how a point scales over GPUs (rows of train.distributed points, bench.gpus = their world size).

Points that differ only in their GPU count form one series: the same model, method, batch per GPU,
sequence, checkpointing, optimizer, dtype, distributed mode and opt-set. Scaling efficiency at N GPUs is
per-GPU tokens/s at N over per-GPU tokens/s on 1 GPU of the same series (1.0: perfect weak scaling, the
global batch grows with the GPUs); a series without a 1-GPU ok row has no efficiency, never a guess. Memory
is the max over ranks (rows keep each rank). Pure functions of rows, no torch.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from optkit.report.tables import GIB, Column, _num, sig, text_col, write_tables
from optkit.results.runs import Point, natural_key, setting_of

_WORLD_PART = re.compile(r"-x\d+$")  # the "<mode>-x<gpus>" part setting_key ends with for a distributed point

SCALING_COLUMNS = [
    text_col("series", "series"),
    text_col("opt", "opt"),
    Column("gpus", "GPUs", _num("gpus", str)),
    text_col("status", "status"),
    Column("tokens_per_s", "tokens/s", _num("tokens_per_s", lambda v: f"{v:,.0f}" if v >= 100 else sig(v)), "high"),
    Column(
        "tokens_per_s_per_gpu",
        "tokens/s per GPU",
        _num("tokens_per_s_per_gpu", lambda v: f"{v:,.0f}" if v >= 100 else sig(v)),
        "high",
    ),
    Column("efficiency", "efficiency vs 1 GPU", _num("efficiency", lambda v: f"{100 * v:.0f}%"), "high"),
    Column("step_ms", "step ms", _num("step_ms", sig), "low"),
    Column("comm_share", "comm share", _num("comm_share", lambda v: f"{100 * v:.0f}%"), "low"),
    Column(
        "peak_allocated_bytes", "peak alloc GiB (max rank)", _num("peak_allocated_bytes", lambda v: f"{v / GIB:.2f}")
    ),
    Column(
        "peak_nvml_timed_bytes",
        "peak NVML timed GiB (max rank)",
        _num("peak_nvml_timed_bytes", lambda v: f"{v / GIB:.2f}"),
        "low",
    ),
]


def series_of(point: Point) -> str:
    """The point's setting with its GPU count dropped: ``llama3_8b/lora/b2/s2048/.../fsdp2``."""
    return _WORLD_PART.sub("", setting_of(point))


def world_of(point: Point) -> int:
    return int(point.head.get("world_size") or 1)


def scaling_entries(points: Sequence[Point]) -> List[Dict[str, Any]]:
    """One entry per distributed point, in series order and by GPU count; efficiency vs the series' 1-GPU
    point."""
    series: Dict[tuple, List[Point]] = defaultdict(list)
    for p in points:
        if p.kind == "train" and (p.head.get("distributed") or "none") != "none":
            series[(series_of(p), str(p.head.get("opt")))].append(p)
    entries = []
    for (name, opt), members in sorted(series.items(), key=lambda kv: [natural_key(k) for k in kv[0]]):
        members.sort(key=world_of)
        one = next((p for p in members if world_of(p) == 1 and p.ok), None)
        reference = _per_gpu(one) if one is not None else None
        for p in members:
            per_gpu = _per_gpu(p)
            entries.append(
                {
                    "series": name,
                    "opt": opt,
                    "gpus": world_of(p),
                    "status": p.status,
                    "point_key": p.key,
                    "tokens_per_s": p.median("tokens_per_s"),
                    "tokens_per_s_per_gpu": per_gpu,
                    "efficiency": per_gpu / reference if per_gpu and reference else None,
                    "step_ms": p.median("step_ms"),
                    "comm_share": p.median("comm_share"),
                    "peak_allocated_bytes": p.median("peak_allocated_bytes"),
                    "peak_nvml_timed_bytes": p.median("peak_nvml_timed_device_bytes"),
                }
            )
    return entries


def _per_gpu(point: Point) -> Optional[float]:
    value = point.median("tokens_per_s_per_gpu")
    if value is None and point.median("tokens_per_s") is not None:  # a row of one process
        value = point.median("tokens_per_s") / world_of(point)
    return value


def scaling_section(points: Sequence[Point], out_dir: Path) -> List[str]:
    """The report's "Scaling over GPUs" section (and scaling.csv / .tex); nothing without distributed rows."""
    entries = scaling_entries(points)
    if not entries:
        return []
    failed = [e for e in entries if e["status"] != "ok"]
    lines = [
        "## Scaling over GPUs",
        "",
        "Throughput of each point in total and per GPU (global real tokens / step time / GPUs), and scaling "
        "efficiency: per-GPU tokens/s at N GPUs over the same series' 1-GPU point (batch per GPU fixed, so the "
        "global batch grows with the GPUs). Memory: the largest rank's. comm share: the profiled step's share "
        "with NCCL kernels running (bench.profile).",
        "",
        write_tables(out_dir, "scaling", SCALING_COLUMNS, entries, "series"),
        "",
    ]
    if failed:
        lines += [f"{len(failed)} point(s) did not run to the end: their status is in the table.", ""]
    return lines
