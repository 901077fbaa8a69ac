"""Where one training step spends its time: a torch.profiler Chrome trace -> kernel-share table.

The point profiles ONE extra, untimed step inside a ``record_function(PROFILED_STEP_REGION)``
range (after the timed windows: a profiler session leaves CUPTI attached and slows later launches,
pytorch/pytorch#144455). This module reads the exported trace (plain dicts, no torch needed) and
answers "what share of the step went to attention, matmuls, optkit's kernels, other Triton, the
optimizer, copies and the rest".

Which events count:
- CUDA: kernels, memcpys and memsets (their device durations) whose launch (the runtime/driver call
  with the same ``correlation`` id) happened inside the region on the host; a device record without
  a matched launch counts if its own timestamp lies in the region. Keying on the launch keeps
  records whose device timestamp came from another clock (pytorch/pytorch#192021) and drops the
  session's pad launches, which run before the region.
- CPU only (no CUDA): host op *self* time (an op's duration minus its direct children's) of the ops
  inside the region; Python time outside any op is not counted. ``time_source`` says which.

A kernel is the optimizer's when it was launched inside an ``Optimizer.step#...`` range (torch
wraps every optimizer's step in one), whatever its name: a non-foreach AdamW is plain elementwise
kernels. The 100% is the sum of the counted durations (device busy time summed over streams), not
the step's wall time.

Host vs device (CUDA only): the step's wall time on the host clock, from its first launch to the end
of the region (the step synchronizes before it leaves), against the union of its device-work
intervals. A device that sat idle for much of that time waited on the host: the step is host-bound.
The same intervals give each copy direction's busy time and the share of it a compute kernel ran
beside (offloaded checkpointing hides its reloads that way). Device intervals are clipped to
[first launch, region end]: work launched in the region runs there, so a record outside carries a
timestamp from another clock.
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from optkit.measure.intervals import Intervals, busy_ms, clip_intervals, overlap_ms

PROFILED_STEP_REGION = "optkit/profiled_step"
CATEGORIES = ("attention", "matmul", "optkit", "other triton", "optimizer", "copy/memset", "elementwise/other")
TIME_SOURCE_CUDA = "cuda_kernels"
TIME_SOURCE_CPU = "cpu_op_self_time"
TOP_KERNELS = 15
NAME_CHARS = 100  # kernel names of templated C++ run to kilobytes; the start names the kernel
DEVICE_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_KINDS = ("cpu_op", "user_annotation")
LAUNCH_KINDS = ("cuda_runtime", "cuda_driver")
OPTIMIZER_RANGE_PREFIX = "Optimizer.step#"
COPY_DIRECTIONS = ("HtoD", "DtoH")  # as Kineto names memcpys: "Memcpy HtoD (Pinned -> Device)"
DEVICE_SPLIT_FIELDS = (
    "profile_step_wall_ms",
    "profile_device_busy_ms",
    "profile_device_idle_share",
    "profile_htod_busy_ms",
    "profile_htod_overlap_fraction",
    "profile_dtoh_busy_ms",
    "profile_dtoh_overlap_fraction",
)
KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"

# Name patterns, checked in CATEGORIES' precedence order (see categorize). Lower-cased names.
_ATTENTION = re.compile(r"flash|fmha|attention|sdpa|scaled_dot_product")
_MATMUL = re.compile(
    r"gemm|gemv|xmma|nvjet|cutlass|cublas|matmul|s16816|h16816|wgmma|splitk"
    r"|^aten::(mm|addmm|bmm|baddbmm|addbmm|_addmm_activation|linear)$"
    r"|(^|: )(mm|addmm|bmm|baddbmm)backward"
)  # autograd's nodes of those ops (CPU profile)
_OPTIMIZER = re.compile(r"multi_tensor_apply|adam|^aten::_foreach_|^aten::_fused_|koptimizer|optimizer")
_COPY = re.compile(
    r"memcpy|memset|copy_kernel|catarraybatchedcopy|fill_kernel|fillfunctor"
    r"|^aten::(copy_|_to_copy|fill_|zero_|clone|cat|contiguous)$"
)
_TRITON_SUFFIX = re.compile(r"\d[0-9a-z]*")
_PLAIN_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # Triton kernels; C++ kernels read "void ns::f<...>(...)"


@lru_cache(maxsize=None)
def optkit_kernel_names(kernels_dir: Path = KERNELS_DIR) -> frozenset:
    """Names of the ``@triton.jit`` functions in optkit/kernels/*.py (read from source: no triton import)."""
    decorated = re.compile(r"@triton\.jit[^\n]*\n(?:\s*@[^\n]*\n)*\s*def\s+(\w+)")
    names = set()
    for path in Path(kernels_dir).glob("*.py"):
        names.update(decorated.findall(path.read_text()))
    return frozenset(names)


def _is_optkit(name: str, optkit_names: frozenset) -> bool:
    if name.startswith("optkit::"):  # our torch.library ops: what a CPU profile sees of our kernels
        return True
    if name in optkit_names:
        return True
    # Older Triton appended a specialization suffix to the kernel name: ``_rope_kernel_0d1d2d3de``.
    stem, _, suffix = name.rpartition("_")
    return bool(stem in optkit_names and _TRITON_SUFFIX.fullmatch(suffix))


def categorize(
    name: str, kind: str = "kernel", in_optimizer: bool = False, optkit_names: Optional[frozenset] = None
) -> str:
    """One of CATEGORIES for a kernel / memcpy / memset / host op named ``name``.

    Precedence: optkit (ours, by name) > optimizer (launched in the optimizer's step, or an optimizer
    kernel by name) > copy/memset > attention > matmul > other triton (``triton_*`` from Inductor,
    or any plain identifier, which is how Triton kernels are named) > elementwise/other.
    """
    names = optkit_kernel_names() if optkit_names is None else optkit_names
    low = name.lower()
    if _is_optkit(name, names):
        return "optkit"
    if in_optimizer or _OPTIMIZER.search(low):
        return "optimizer"
    if kind in ("gpu_memcpy", "gpu_memset") or _COPY.search(low):
        return "copy/memset"
    if _ATTENTION.search(low):
        return "attention"
    if _MATMUL.search(low):
        return "matmul"
    if kind == "kernel" and (low.startswith("triton_") or _PLAIN_IDENTIFIER.fullmatch(name)):
        return "other triton"
    return "elementwise/other"


@dataclass(frozen=True)
class TimedEvent:
    """One counted event of the profiled step: its time (device or self) and what it was."""

    name: str
    kind: str  # "kernel" | "gpu_memcpy" | "gpu_memset" | "cpu_op" | "user_annotation"
    time_us: float
    in_optimizer: bool
    start_us: float = 0.0  # device events: where the device ran it, on the trace's (host) clock
    launched_us: Optional[float] = None  # device events: the host time of its launch


class ProfileError(ValueError):
    """The trace has no profiled-step region or nothing inside it."""


def _interval(event: Dict[str, Any]) -> Tuple[float, float]:
    start = float(event.get("ts", 0.0))
    return start, start + float(event.get("dur", 0.0))


def _region(events: Sequence[Dict[str, Any]], region: str) -> Tuple[float, float]:
    found = [_interval(e) for e in events if e.get("name") == region and e.get("cat") in HOST_KINDS]
    if not found:
        raise ProfileError(f"trace has no {region!r} range: was the step run inside record_function({region!r})?")
    return max(found, key=lambda iv: iv[1] - iv[0])


def device_events(events: Sequence[Dict[str, Any]], region: str = PROFILED_STEP_REGION) -> List[TimedEvent]:
    """The kernels / memcpys / memsets launched inside ``region``, with their device durations."""
    start, end = _region(events, region)
    optimizer = Intervals(
        _interval(e)
        for e in events
        if e.get("cat") in HOST_KINDS and str(e.get("name", "")).startswith(OPTIMIZER_RANGE_PREFIX)
    )
    launches = {
        e["args"]["correlation"]: float(e.get("ts", 0.0))
        for e in events
        if e.get("cat") in LAUNCH_KINDS and "correlation" in (e.get("args") or {})
    }
    out = []
    for e in events:
        if e.get("cat") not in DEVICE_KINDS:
            continue
        launched = launches.get((e.get("args") or {}).get("correlation"), float(e.get("ts", 0.0)))
        if start <= launched <= end:
            out.append(
                TimedEvent(
                    str(e.get("name")),
                    e["cat"],
                    float(e.get("dur", 0.0)),
                    optimizer.contains(launched),
                    start_us=float(e.get("ts", 0.0)),
                    launched_us=launched,
                )
            )
    return out


def device_split(timed: Sequence[TimedEvent], region_end_us: float) -> Dict[str, Any]:
    """DEVICE_SPLIT_FIELDS of a step from its device events (``device_events``) and the region's end:
    wall time from the first launch, the device's busy time and idle share, and per copy direction the
    copies' busy time and the share of it overlapped by a compute kernel (None without such copies)."""
    if not timed:
        return dict.fromkeys(DEVICE_SPLIT_FIELDS)
    first_launch = min(e.launched_us for e in timed)

    def spans(events: Iterable[TimedEvent]) -> List[Tuple[float, float]]:
        return clip_intervals(((e.start_us, e.start_us + e.time_us) for e in events), first_launch, region_end_us)

    wall_ms = (region_end_us - first_launch) / 1e3
    busy = busy_ms(spans(timed))
    fields: Dict[str, Any] = {
        "profile_step_wall_ms": round(wall_ms, 4),
        "profile_device_busy_ms": round(busy, 4),
        "profile_device_idle_share": round(1.0 - busy / wall_ms, 4) if wall_ms > 0 else None,
    }
    compute = spans(e for e in timed if e.kind == "kernel")
    for direction in COPY_DIRECTIONS:
        copies = spans(e for e in timed if e.kind == "gpu_memcpy" and direction in e.name)
        copy_busy = busy_ms(copies)
        prefix = f"profile_{direction.lower()}"
        fields[f"{prefix}_busy_ms"] = round(copy_busy, 4) if copies else None
        fields[f"{prefix}_overlap_fraction"] = round(overlap_ms(copies, compute) / copy_busy, 4) if copy_busy else None
    return fields


def host_self_events(events: Sequence[Dict[str, Any]], region: str = PROFILED_STEP_REGION) -> List[TimedEvent]:
    """Host ops inside ``region`` with their self time (duration minus direct children), per thread."""
    start, end = _region(events, region)
    inside = [
        e
        for e in events
        if e.get("cat") in HOST_KINDS
        and e.get("name") != region
        and start <= _interval(e)[0]
        and _interval(e)[1] <= end
    ]
    optimizer = Intervals(_interval(e) for e in inside if str(e.get("name", "")).startswith(OPTIMIZER_RANGE_PREFIX))
    by_thread: Dict[Any, List[Dict[str, Any]]] = defaultdict(list)
    for e in inside:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for thread_events in by_thread.values():
        # Parents first: earlier start, and on a tie the longer one encloses the shorter.
        ordered = sorted(thread_events, key=lambda e: (_interval(e)[0], -_interval(e)[1]))
        self_us = [float(e.get("dur", 0.0)) for e in ordered]
        stack: List[int] = []
        for i, e in enumerate(ordered):
            e_start, e_end = _interval(e)
            while stack and _interval(ordered[stack[-1]])[1] < e_end:
                stack.pop()  # ended before this one does: not its parent
            if stack and _interval(ordered[stack[-1]])[0] <= e_start:
                self_us[stack[-1]] -= e_end - e_start
            stack.append(i)
        out.extend(
            TimedEvent(str(e.get("name")), e["cat"], max(0.0, s), optimizer.contains(_interval(e)[0]))
            for e, s in zip(ordered, self_us)
        )
    return out


def kernel_share(events: Sequence[TimedEvent], optkit_names: Optional[frozenset] = None) -> List[Dict[str, Any]]:
    """[{category, time_ms, share_pct}] in CATEGORIES order (every category, zeros included)."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for e in events:
        totals[categorize(e.name, e.kind, e.in_optimizer, optkit_names)] += e.time_us
    whole = sum(totals.values())
    return [
        {"category": c, "time_ms": round(us / 1e3, 4), "share_pct": round(100.0 * us / whole, 2) if whole else 0.0}
        for c, us in totals.items()
    ]


def top_kernels(
    events: Sequence[TimedEvent], n: int = TOP_KERNELS, optkit_names: Optional[frozenset] = None
) -> List[Dict[str, Any]]:
    """The ``n`` names with the most time: [{name (truncated), category, calls, total_ms}]."""
    grouped: Dict[Tuple[str, str], List[float]] = defaultdict(list)
    for e in events:
        grouped[(e.name, categorize(e.name, e.kind, e.in_optimizer, optkit_names))].append(e.time_us)
    ranked = sorted(grouped.items(), key=lambda item: -sum(item[1]))[:n]
    return [
        {
            "name": name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "…",
            "category": category,
            "calls": len(times),
            "total_ms": round(sum(times) / 1e3, 4),
        }
        for (name, category), times in ranked
    ]


def summarize_trace(trace: Dict[str, Any], on_cuda: bool, region: str = PROFILED_STEP_REGION) -> Dict[str, Any]:
    """The row fields of a profiled step from its Chrome trace (``{"traceEvents": [...]}``)."""
    events = trace.get("traceEvents") or []
    timed = device_events(events, region) if on_cuda else host_self_events(events, region)
    if not timed:
        raise ProfileError(f"no {'device' if on_cuda else 'host op'} events inside {region!r}")
    fields = {
        "profile_time_source": TIME_SOURCE_CUDA if on_cuda else TIME_SOURCE_CPU,
        "profile_step_ms": round(sum(e.time_us for e in timed) / 1e3, 4),
        "profile_kernel_share": kernel_share(timed),
        "profile_top_kernels": top_kernels(timed),
    }
    # without CUDA there is no device work to set against the host's time: None, as profile_time_source says
    fields.update(device_split(timed, _region(events, region)[1]) if on_cuda else dict.fromkeys(DEVICE_SPLIT_FIELDS))
    return fields


def profile_step(step: Callable[[], Any], device, trace_path: Path) -> Dict[str, Any]:
    """Run ``step()`` once under torch.profiler (CPU + CUDA activity on a GPU, CPU only otherwise),
    write its Chrome/Perfetto trace gzip-compressed to ``trace_path`` and return the summary fields.

    ``step`` must finish its device work before returning (synchronize) so the region holds it."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from optkit.measure.device_trace import pad_launches

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with tempfile.TemporaryDirectory(prefix="optkit-trace-") as tmp:
        raw = Path(tmp) / "trace.json"
        with profile(activities=activities) as prof:
            if on_cuda:
                pad_launches(device)
            with record_function(PROFILED_STEP_REGION):
                step()
        prof.export_chrome_trace(str(raw))
        text = raw.read_bytes()
    trace_path = Path(trace_path)
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(trace_path, "wb", compresslevel=6) as fh:
        fh.write(text)
    return summarize_trace(json.loads(text), on_cuda)
