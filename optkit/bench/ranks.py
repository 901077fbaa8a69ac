"""The row of a point that ran on several processes: every rank's rows gathered to rank 0 and merged there.

Conventions (torchtitan's and torchtune's): throughput is global (every rank's real tokens over the step
time) and per GPU (global / world size); memory is per device, summarized as the max over ranks and kept
for each rank, never summed; energy is summed over the ranks' GPUs; timing and the step split are rank
0's (the ranks meet in every step's collectives, so their steps end together; each rank's median is in
``step_ms_per_rank``). The loss is the mean of the ranks' losses: the objective DDP and FSDP2 train, which
equals the loss of one process on the global batch when every rank has as many trained tokens.

A rank whose point failed does not gather (its peers may be stuck in a collective it never reaches): it
writes its rows beside rank 0's (optkit.bench.launch) and exits with an error, and torchrun ends the rest.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from optkit.train.distributed import World, current_world

MAX_OVER_RANKS = (
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "peak_active_bytes",
    "num_alloc_retries",
    "num_ooms",
    "peak_nvml_device_bytes",
    "peak_nvml_process_bytes",
    "peak_nvml_timed_device_bytes",
    "peak_rss_bytes",
)
PER_RANK = (
    "step_ms",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "peak_nvml_device_bytes",
    "peak_nvml_timed_device_bytes",
    "peak_rss_bytes",
)
SUM_OVER_RANKS = ("tokens_per_step", "padded_tokens_per_step", "energy_mj", "timed_energy_j", "avg_power_w")
_COMM_KERNEL = ("nccl",)  # NCCL's kernels: ncclDevKernel_AllGather_RING_LL, ncclKernel_ReduceScatter_...


def rank_suffix() -> str:
    """A name suffix for files each rank writes (traces): empty on rank 0."""
    rank = current_world().rank
    return f"-rank{rank}" if rank else ""


def rank_rows_file(out: Path, rank: int) -> Path:
    """Where rank ``rank`` writes its rows when its part of the point failed."""
    out = Path(out)
    return out.with_name(f"{out.stem}.rank{rank}{out.suffix}")


def write_rank_failure(out: Path, rank: int, rows: List[Dict[str, Any]]) -> None:
    """A failed rank's rows, with the time it failed (the runner keeps the first failure)."""
    from optkit.results.rows import finite, json_default

    payload = {"rank": rank, "failed_at": time.time(), "rows": finite(rows)}
    rank_rows_file(out, rank).write_text(json.dumps(payload, default=json_default))


def finish_ranks(rows: List[Dict[str, Any]], world: World, out: Path, run_dir: Optional[Path]):
    """The rows this process should write to ``out``: its own for a point of one process not launched by
    torchrun; for a launched one the merged rows on rank 0 and None on the other ranks. A rank with a failed
    row writes its rows for the runner and exits here with code 1."""
    if world.backend is None:
        return rows
    if any(row.get("status") != "ok" for row in rows):
        write_rank_failure(out, world.rank, [_name_rank(row, world.rank) for row in rows])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # no atexit, no process-group teardown: the peers may be inside a collective
    import torch.distributed as dist

    gathered: List[Any] = [None] * world.size
    dist.all_gather_object(gathered, rows)
    if not world.is_main:
        return None
    return [merge_ranks([ranks[i] for ranks in gathered], run_dir) for i in range(len(rows))]


def _name_rank(row: Dict[str, Any], rank: int) -> Dict[str, Any]:
    if row.get("status") in ("oom", "error") and row.get("error"):
        return dict(row, error=f"rank {rank}: {row['error']}")
    return row


def merge_ranks(rows: List[Dict[str, Any]], run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """One row from the same window's row of every rank (rank order)."""
    merged = dict(rows[0])
    world = len(rows)
    for name in MAX_OVER_RANKS:
        values = [r.get(name) for r in rows if r.get(name) is not None]
        merged[name] = max(values) if values else None
    for name in PER_RANK:
        merged[f"{name}_per_rank"] = [r.get(name) for r in rows]
    for name in SUM_OVER_RANKS:
        values = [r.get(name) for r in rows]
        merged[name] = sum(values) if values and None not in values else None
    merged.update(_throughput(merged, world))
    merged.update(_loss(rows))
    merged["world_size"] = world
    merged["dist_backend"] = current_world().backend
    merged.update(comm_fields(merged, run_dir) if world > 1 else {})
    return merged


def _throughput(row: Dict[str, Any], world: int) -> Dict[str, Any]:
    from optkit.measure.flops import mfu

    tokens, step_ms = row.get("tokens_per_step"), row.get("step_ms")
    if not tokens or not step_ms:
        return {"tokens_per_s_per_gpu": None}
    tokens_per_s = tokens / (step_ms / 1e3)
    per_gpu = tokens_per_s / world
    steps = len(row.get("step_times_ms") or [])
    energy = row.get("timed_energy_j")

    def utilization(flops_field: str) -> Optional[float]:  # against one GPU's peak: per-GPU tokens
        return mfu(per_gpu, row[flops_field], row.get("peak_tflops")) if row.get(flops_field) else None

    return {
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": per_gpu,
        "mfu": utilization("flops_per_token"),
        "hfu": utilization("hw_flops_per_token"),
        "energy_j_per_token": energy / (tokens * steps) if energy is not None and steps else None,
    }


def _loss(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    curves = [r.get("loss_curve") or [] for r in rows]
    if not curves[0] or any(len(c) != len(curves[0]) or None in c for c in curves):
        return {}
    curve = [sum(values) / len(values) for values in zip(*curves)]
    return {"loss_curve": curve, "loss_last": curve[-1]}


def comm_fields(row: Dict[str, Any], run_dir: Optional[Path]) -> Dict[str, Any]:
    """comm_share and comm_exposed_share of rank 0's profiled step, from its trace; None where the trace
    cannot tell (no profile, or a trace without device kernels: the CPU's gloo runs no kernel)."""
    none = {"comm_share": None, "comm_exposed_share": None}
    wall_ms, trace = row.get("profile_step_wall_ms"), row.get("trace_path")
    if not wall_ms or not trace or run_dir is None:
        return none
    from optkit.measure.intervals import busy_ms, overlap_ms
    from optkit.measure.profile import ProfileError, device_events

    try:
        with gzip.open(Path(run_dir) / trace, "rt") as fh:
            timed = device_events(json.load(fh).get("traceEvents") or [])
    except (OSError, ValueError, ProfileError):
        return none
    kernels = [e for e in timed if e.kind == "kernel"]
    if not kernels:
        return none
    comm = [(e.start_us, e.start_us + e.time_us) for e in kernels if _is_comm(e.name)]
    compute = [(e.start_us, e.start_us + e.time_us) for e in kernels if not _is_comm(e.name)]
    comm_ms = busy_ms(comm)
    exposed_ms = comm_ms - overlap_ms(comm, compute)
    return {"comm_share": round(comm_ms / wall_ms, 4), "comm_exposed_share": round(exposed_ms / wall_ms, 4)}


def _is_comm(name: str) -> bool:
    low = name.lower()
    return any(mark in low for mark in _COMM_KERNEL)
