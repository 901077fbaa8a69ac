"""The kernel row: its fields (``KERNEL_ROW_FIELDS``, each with its meaning), the reasons a row's
status or device time can carry, and filling a row from a measurement.

One row per op x shape x dtype x implementation. A row's fields and their meaning are versioned by
``KERNEL_SCHEMA_VERSION``: bump it when a field changes meaning. Also per row: achieved GB/s from
the bytes the op must move (optkit/bench/kernels/byte_model.py), beside the device's copy bandwidth
measured in the same run (one large device-to-device copy, bytes read + written); allocator peak of
one forward+backward, absolute and as the delta over the inputs; NVML clocks, throttle reasons and
other GPU processes while the row's event pass ran; the event time of a CUDA-graph replay of the same
call (``graph_ms``) and whether the op is launch-bound. A forward-only op's rows (``forward_only``) have
no backward: their full_* fields are the forward's and their bwd_* fields are None.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Dict, Optional, Sequence

import torch

from optkit.bench.kernels.cases import DTYPES, Case
from optkit.bench.kernels.context import RunContext
from optkit.bench.kernels.impls import CHUNK_IMPLS, computes_grad_in_forward, impl_version
from optkit.bench.kernels.ops import SPECS
from optkit.measure.device_timing import Measurement
from optkit.measure.device_trace import DeviceTimes
from optkit.measure.stats import percentile, summarize
from optkit.results.rows import PEER_LIBRARIES, ROW_FIELDS

KERNEL_SCHEMA_VERSION = 2  # bump when a kernel row field changes meaning (2: device-time fields)
SUITE = "kernels"
NVML_INTERVAL_MS = 50.0  # clocks / throttling only (memory comes from the allocator): sample lightly

# Event time this much above the graph replay's means launches, not kernels, set the time: both are medians
# of event-timed repeats, and a noisy row's IQR is > 10% of its median, so a 25% gap is beyond their noise.
LAUNCH_BOUND_RATIO = 1.25

KERNEL_ROW_FIELDS: Dict[str, str] = {
    "schema_version": "KERNEL_SCHEMA_VERSION of the code that wrote the row",
    "run_id": "id of the run (its directory name)",
    "suite": "'kernels'",
    "kind": "'kernel'",
    "status": "ok | oom | error | skipped",
    "error": "why, when status != ok",
    "op": "one of OPS",
    "impl": "optkit | eager | compile | liger | bitsandbytes (nf4_dequantize) | optkit-c<rows> (FLCE chunk sweep) "
    "| optkit-inplace (rope written over q and k)",
    "impl_version": "version of the impl's code",
    "dtype": "input dtype",
    "model": "zoo model the shape comes from",
    "shape": "shape string, e.g. T4096xH4096",
    "dims": "named dims of the shape",
    "params": "op parameters (eps, cast_mode, softcap, ...)",
    "tokens": "N, rows of the op (None for nf4_dequantize: a weight, no tokens)",
    "hidden": "features per token of the op's main input (nf4_dequantize: the weight's in-features)",
    "point_key": "op/impl/dtype/shape (what regress matches on)",
    "device": "cuda | cpu",
    "timer": "cuda_events | host_clock",
    "warmup_steps": "untimed forward+backward (forward_only: forward) steps",
    "repeats": "timed repeats per loop",
    "compile_s": "wall time of the first call (compile / JIT), s",
    "fwd_ms": "median forward event time (cold L2; launch gaps included)",
    "bwd_ms": "median backward event time (own loop, cold L2); None when forward_only",
    "full_ms": "median forward+backward event time (the forward when forward_only): first launch to last kernel "
    "end, host gaps included",
    "full_ms_p10": "10th percentile",
    "full_ms_p90": "90th percentile",
    "full_ms_iqr": "interquartile range",
    "full_ms_noisy": "IQR / median > 10%",
    "full_times_ms": "every timed full repeat",
    "fwd_times_ms": "every forward",
    "bwd_times_ms": "every backward (None when forward_only)",
    "bytes_fwd": "bytes the forward must move",
    "bytes_bwd": "bytes the backward must move; None when forward_only",
    "bytes_full": "bytes_fwd + bytes_bwd (bytes_fwd when forward_only)",
    "gbps_full": "bytes_full / full_ms, GB/s (1e9): op + launch path (a host-bound op shows the host here)",
    "gbps_fwd": "None when loss_in_forward",
    "gbps_bwd": "None when loss_in_forward or forward_only",
    "copy_gbps": "device-to-device copy bandwidth measured in this run (read + written)",
    "frac_of_copy": "gbps_full / copy_gbps",
    "flops_full": "matmul FLOPs of forward+backward (FLCE only)",
    "fwd_device_ms": "median time the forward's kernels/memcpys/memsets ran (profiler, cold L2): no host gaps",
    "bwd_device_ms": "the same for the backward (forward untraced, L2 flushed in between); None when forward_only",
    "full_device_ms": "the same for forward+backward in one traced region",
    "full_device_times_ms": "every profiled forward+backward's device time",
    "device_repeats": "profiled repeats per phase",
    "n_kernels_full": "kernels + memcpys + memsets per forward+backward (median over the profiled repeats)",
    "gbps_device": "bytes_full / full_device_ms, GB/s: the kernels' own bandwidth",
    "frac_of_copy_device": "gbps_device / copy_gbps: what a bandwidth target (e.g. >= 85% of copy) is judged on",
    "device_error": "why the device fields are None on an ok row (no CUDA, pass not run, trace lost records)",
    "graph_ms": "median event time of one CUDA-graph replay of forward+backward (the forward when forward_only), "
    "cold L2, inputs refilled outside the timed span: the kernels without host cost (Python, autograd, launches)",
    "graph_times_ms": "every timed replay",
    "graph_error": "why graph_ms is None on an ok row (no CUDA; a call that syncs with the host cannot be captured)",
    "launch_overhead_ms": "full_ms - graph_ms: what launching the op from the host adds to its event time",
    "launch_bound": f"full_ms >= {LAUNCH_BOUND_RATIO} x graph_ms: host launch cost, not the kernels, sets the op's "
    "event time (faster kernels would not help; fewer launches or a graph would)",
    "tflops_full": "flops_full / full_ms, TFLOP/s",
    "loss_in_forward": "impl computes grads in forward: compare full_ms / full_device_ms",
    "forward_only": "the op has no backward (nf4_dequantize: the quantized weight is frozen): full_* is the forward",
    "peak_bytes": "allocator peak during one forward+backward, or forward when forward_only (includes inputs and "
    "the flush buffer)",
    "peak_delta_bytes": "peak_bytes - allocated before the call: the op's own memory",
    "peak_reserved_bytes": "allocator reserved peak",
    "l2_flush_bytes": "bytes written before each repeat",
    "throttled": "NVML saw a performance-limiting clock reason while this row was measured (None: no NVML)",
    "throttle_reasons": "NVML clock-event reasons seen",
    "sm_clock_mhz_min": "lowest SM clock sampled",
    "other_gpu_processes": "other processes on the GPU when the row started ([{pid, used_bytes}])",
    "gpu_name": "GPU name",
    "gpu_slug": "e.g. h100",
    "driver": "NVIDIA driver",
    "torch": "torch version",
    "triton": "triton version",
    "transformers": "transformers version",
    **{name: ROW_FIELDS[name] for name in PEER_LIBRARIES},  # the libraries defining an opt-set or a peer
    "git_sha": "optkit commit",
    "git_dirty": "uncommitted changes",
    "env_fingerprint": "comparable-stack hash",
    "timestamp": "UTC ISO time the row was written",
}


def empty_kernel_row() -> Dict[str, Any]:
    row = dict.fromkeys(KERNEL_ROW_FIELDS)
    row.update(schema_version=KERNEL_SCHEMA_VERSION, suite=SUITE, kind="kernel")
    return row


NO_CUDA_REASON = (
    "no CUDA device: the kernels suite times GPU kernels; run it on a GPU machine "
    "(python -m optkit.bench.kernels.run --run-dir DIR --cpu-smoke checks the plumbing on CPU)"
)
SMOKE_COMPILE_REASON = "torch.compile is not timed in the CPU smoke (inductor's C++ build takes minutes)"
NO_DEVICE_TIME_REASON = "device time needs CUDA (torch.profiler's CUDA activity); this run is on the CPU"
DEVICE_OFF_REASON = "device pass off (device_repeats=0)"
DEVICE_PENDING_REASON = (
    "device pass not run: it follows every event-timed row (see kernel_suite's doc) "
    "and this run stopped before it ended"
)


def _gbps(nbytes: Optional[int], ms: Optional[float]) -> Optional[float]:
    return None if not nbytes or not ms else nbytes / (ms * 1e-3) / 1e9


def _median(values: Sequence[float]) -> Optional[float]:
    return percentile(sorted(values), 50) if values else None


def fill_measurement(row: Dict[str, Any], m: Measurement, copy_gbps: Optional[float]) -> None:
    """Times, bandwidths and memory of an ok row (row already has bytes_* and flops_full)."""
    stats = summarize(m.full_ms)
    fwd, bwd = _median(m.fwd_ms), _median(m.bwd_ms)
    split_is_meaningful = not row["loss_in_forward"]
    row.update(
        status="ok",
        compile_s=m.compile_s,
        warmup_steps=m.warmup_steps,
        repeats=m.repeats,
        fwd_ms=fwd,
        bwd_ms=bwd,
        full_ms=stats["median"],
        full_ms_p10=stats["p10"],
        full_ms_p90=stats["p90"],
        full_ms_iqr=stats["iqr"],
        full_ms_noisy=stats["noisy"],
        full_times_ms=list(m.full_ms),
        fwd_times_ms=list(m.fwd_ms),
        bwd_times_ms=None if row["forward_only"] else list(m.bwd_ms),
        gbps_full=_gbps(row["bytes_full"], stats["median"]),
        gbps_fwd=_gbps(row["bytes_fwd"], fwd) if split_is_meaningful else None,
        gbps_bwd=_gbps(row["bytes_bwd"], bwd) if split_is_meaningful else None,
        peak_bytes=m.peak_bytes,
        peak_delta_bytes=m.peak_delta_bytes,
        peak_reserved_bytes=m.peak_reserved_bytes,
    )
    row["frac_of_copy"] = row["gbps_full"] / copy_gbps if row["gbps_full"] and copy_gbps else None
    if row["flops_full"]:
        row["tflops_full"] = row["flops_full"] / (stats["median"] * 1e-3) / 1e12


def fill_device(row: Dict[str, Any], times: DeviceTimes, copy_gbps: Optional[float]) -> None:
    """The device-time fields of an ok row, from its profiled repeats."""
    full = _median(times.full_ms)
    gbps = _gbps(row["bytes_full"], full)
    row.update(
        fwd_device_ms=_median(times.fwd_ms),
        bwd_device_ms=_median(times.bwd_ms),
        full_device_ms=full,
        full_device_times_ms=list(times.full_ms),
        device_repeats=len(times.full_ms),
        n_kernels_full=sorted(times.full_events)[len(times.full_events) // 2],
        gbps_device=gbps,
        frac_of_copy_device=gbps / copy_gbps if gbps and copy_gbps else None,
        device_error=None,
    )


def is_launch_bound(full_ms: Optional[float], graph_ms: Optional[float]) -> Optional[bool]:
    """Whether host launches set the event time (see LAUNCH_BOUND_RATIO); None without both times."""
    if not full_ms or not graph_ms:
        return None
    return full_ms >= LAUNCH_BOUND_RATIO * graph_ms


def fill_graph(row: Dict[str, Any], graph_times_ms: Optional[Sequence[float]], error: Optional[str]) -> None:
    """The graph-replay fields of an ok row (its full_ms already filled): the replays' times, or why there are none."""
    graph = _median(graph_times_ms or [])
    row.update(
        graph_ms=graph,
        graph_times_ms=list(graph_times_ms) if graph_times_ms else None,
        graph_error=None if graph is not None else error,
        launch_overhead_ms=row["full_ms"] - graph if graph is not None and row["full_ms"] is not None else None,
        launch_bound=is_launch_bound(row["full_ms"], graph),
    )


def base_row(case: Case, impl: str, dtype_name: str, context: RunContext) -> Dict[str, Any]:
    spec = SPECS[case.op]
    fwd_bytes, bwd_bytes = spec.bytes_moved(case, DTYPES[dtype_name].itemsize)
    dims = case.dims
    hidden = dims.get("H") or dims.get("I") or dims.get("V") or (dims["Hq"] + dims["Hkv"]) * dims["D"]
    row = empty_kernel_row()
    row.update(context.env_fields)
    params = dict(case.params, **({"chunk_rows": CHUNK_IMPLS[impl]} if impl in CHUNK_IMPLS else {}))
    row.update(
        run_id=context.run_id,
        op=case.op,
        impl=impl,
        impl_version=impl_version(impl, context.env),
        dtype=dtype_name,
        model=case.model,
        shape=case.shape,
        dims=dict(dims),
        params=params,
        tokens=case.tokens,
        hidden=hidden,
        point_key=f"{case.op}/{impl}/{dtype_name}/{case.shape}",
        device=context.device.type,
        timer="cuda_events" if context.device.type == "cuda" else "host_clock",
        bytes_fwd=fwd_bytes,
        bytes_bwd=bwd_bytes,
        bytes_full=fwd_bytes + (bwd_bytes or 0),
        flops_full=spec.flops_full(case),
        copy_gbps=context.copy_gbps,
        l2_flush_bytes=context.flush.nbytes,
        loss_in_forward=computes_grad_in_forward(spec, impl),
        forward_only=spec.forward_only,
    )
    return row


def stamp_row(row: Dict[str, Any]) -> Dict[str, Any]:
    row["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


def failure_row(row: Dict[str, Any], status: str, message: str) -> Dict[str, Any]:
    row.update(status=status, error=message)
    return stamp_row(row)


def start_nvml(device: torch.device):
    """An NVML sampler of clocks and throttling for the row about to be measured; None off CUDA."""
    if device.type != "cuda":
        return None
    from optkit.measure.nvml import NvmlSampler

    index = device.index if device.index is not None else torch.cuda.current_device()
    return NvmlSampler(device_index=index, interval_ms=NVML_INTERVAL_MS).start()


def fill_nvml(row: Dict[str, Any], sampler) -> None:
    """Stop the sampler and put what it saw (throttling, lowest SM clock, other processes) in the row."""
    report = sampler.stop() if sampler is not None else None
    if report is None or not report.available:
        return
    row.update(
        throttled=report.throttled,
        throttle_reasons=list(report.throttle_reasons_seen),
        sm_clock_mhz_min=report.sm_clock_mhz_min,
        other_gpu_processes=report.other_processes_at_start,
    )
