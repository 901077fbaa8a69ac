"""Device time of a call under torch.profiler: how long its kernels, memcpys and memsets ran, host
gaps excluded (what the kernels cost when the host keeps ahead).

Each repeat of a phase (forward, backward, forward+backward = "full") runs in its own
``record_function`` region of a profiler session with CUDA and CPU activity (the region markers are
host events). Regions are record_function ranges on the host clock, which Kineto also converts
device timestamps to. A region is entered after a synchronize (inputs copied, L2 flushed) and left
after one, so the device work that starts inside a region's host interval is that region's work,
and only that; its time is the union of that work's intervals (one stream: their summed durations).

Each new session in a process returns a few kernel records at its head with timestamps from another
clock, one more per session (pytorch/pytorch#192021): a session therefore opens with a burst of
throw-away launches (``pad_session_head``), and a session whose burst was entirely lost gives no
device times. Event timing of the same calls lives in optkit/measure/device_timing.py.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from optkit.measure.device_timing import (
    as_tuple,
    backward_wrt_inputs,
    clone_all,
    forward_backward,
    fresh_inputs,
    synchronize,
)
from optkit.measure.intervals import busy_ms

REGION_PREFIX = "optkit.bench/"
PAD_REGION = REGION_PREFIX + "pad"
# Throw-away launches that open every session, plus 2 per earlier session in the process: each new
# session returns one more head record with a foreign timestamp (pytorch/pytorch#192021).
PAD_LAUNCHES = 32
# Device-side events that are not the op's work: the device copies of our region markers (also
# excluded by name), synchronization records (only with Kineto's sync events on), profiler ranges.
NOT_WORK_KINDS = ("gpu_user_annotation", "cuda_sync", "cuda_profiler_range")
PHASES = ("full", "fwd", "bwd")


@dataclass(frozen=True)
class TraceEvent:
    """What the device pass reads of one profiler event (times in us on the profiler's clock)."""

    name: str
    on_device: bool
    start_us: float
    end_us: float
    kind: Optional[str] = None  # Kineto's activity type ("kernel", "gpu_memcpy", ...) where torch has it


class DeviceTraceError(Exception):
    """The trace cannot give this row a device time (records lost, a region missing)."""


def region_name(impl: str, phase: str, index: int) -> str:
    return f"{REGION_PREFIX}{impl}/{phase}/{index}"


def is_device_work(event: TraceEvent) -> bool:
    """A kernel, memcpy or memset (an unknown kind counts: better a visible surplus than a silent gap)."""
    if not event.on_device or event.name.startswith(REGION_PREFIX):
        return False
    return event.kind not in NOT_WORK_KINDS


def device_time_by_region(events: Iterable[TraceEvent]) -> Dict[str, Tuple[float, int]]:
    """Region name -> (busy ms, number of device events) of the device work that started inside it."""
    events = list(events)
    regions = sorted(
        (e.start_us, e.end_us, e.name) for e in events if not e.on_device and e.name.startswith(REGION_PREFIX)
    )
    starts = [start for start, _, _ in regions]
    members: Dict[str, List[Tuple[float, float]]] = {name: [] for _, _, name in regions}
    for e in events:
        if not is_device_work(e):
            continue
        i = bisect.bisect_right(starts, e.start_us) - 1
        if i >= 0 and e.start_us <= regions[i][1]:
            members[regions[i][2]].append((e.start_us, e.end_us))
    return {name: (busy_ms(intervals), len(intervals)) for name, intervals in members.items()}


@dataclass
class DeviceTimes:
    fwd_ms: List[float]
    bwd_ms: List[float]
    full_ms: List[float]
    full_events: List[int]
    uneven_phases: List[str] = field(default_factory=list)  # device-event count varies over repeats


def _phase_repeats(
    regions: Dict[str, Tuple[float, int]], impl: str, phase: str, repeats: int, label: str
) -> List[Tuple[float, int]]:
    """(device ms, device events) of each traced repeat of one phase; raises DeviceTraceError."""
    found = [regions.get(region_name(impl, phase, i)) for i in range(repeats)]
    missing = sum(f is None for f in found)
    if missing:
        raise DeviceTraceError(f"the trace lacks {missing} of {impl}'s {repeats} {label} regions")
    if any(n_events == 0 for _, n_events in found):
        raise DeviceTraceError(f"a traced {label} repeat of {impl} holds no device work: the profiler lost its records")
    return found


def device_times(regions: Dict[str, Tuple[float, int]], impl: str, repeats: int) -> DeviceTimes:
    """One impl's repeats of every phase, from ``device_time_by_region``; raises DeviceTraceError."""
    by_phase = {phase: _phase_repeats(regions, impl, phase, repeats, phase) for phase in PHASES}
    uneven = [phase for phase, found in by_phase.items() if len({n_events for _, n_events in found}) > 1]
    return DeviceTimes(
        fwd_ms=[ms for ms, _ in by_phase["fwd"]],
        bwd_ms=[ms for ms, _ in by_phase["bwd"]],
        full_ms=[ms for ms, _ in by_phase["full"]],
        full_events=[n for _, n in by_phase["full"]],
        uneven_phases=uneven,
    )


def trace_events(function_events: Iterable[Any]) -> List[TraceEvent]:
    """torch.profiler FunctionEvents -> the region markers and device events among them.

    Reads only what torch 2.x has kept stable (name, device_type, time_range; a device event's
    time_range is also what its ``device_time_total`` / older ``cuda_time_total`` report), and
    ``activity_type`` where this torch has it.
    """
    out = []
    for e in function_events:
        on_device = str(e.device_type).rsplit(".", 1)[-1] == "CUDA"
        if on_device or e.name.startswith(REGION_PREFIX):
            kind = getattr(e, "activity_type", None)
            out.append(
                TraceEvent(
                    e.name,
                    on_device,
                    float(e.time_range.start),
                    float(e.time_range.end),
                    None if kind is None else str(kind),
                )
            )
    return out


class ProfilerTrace:
    """One torch.profiler session; CPU activity too, because the region markers are host events."""

    def __init__(self):
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def __enter__(self) -> "ProfilerTrace":
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)

    def region(self, name: str):
        return torch.profiler.record_function(name)

    def events(self) -> List[TraceEvent]:
        return trace_events(self._profile.events())


def _settle(flush: Callable[[], None], device: torch.device) -> None:
    """Before a region: flush L2 and let the device drain, so the region starts idle and cold."""
    flush()
    synchronize(device)


def trace_phases(
    trace,
    impl: str,
    call: Callable,
    master: Dict[str, torch.Tensor],
    grad_outputs,
    device: torch.device,
    flush: Callable[[], None],
    repeats: int,
) -> None:
    """full, fwd and bwd ``repeats`` times each, as the event pass runs them, one region per repeat."""
    for i in range(repeats):
        inputs, grads = fresh_inputs(master), clone_all(grad_outputs)
        _settle(flush, device)
        with trace.region(region_name(impl, "full", i)):
            forward_backward(call, inputs, grads)
            synchronize(device)
        del inputs, grads
    for i in range(repeats):
        inputs = fresh_inputs(master)
        _settle(flush, device)
        with trace.region(region_name(impl, "fwd", i)):
            outs = call(**inputs)
            synchronize(device)
        del inputs, outs
    for i in range(repeats):
        inputs, grads = fresh_inputs(master), clone_all(grad_outputs)
        outs = as_tuple(call(**inputs))
        _settle(flush, device)
        with trace.region(region_name(impl, "bwd", i)):
            backward_wrt_inputs(outs, inputs, grads)
            synchronize(device)
        del inputs, outs, grads


def trace_forward(
    trace,
    impl: str,
    call: Callable,
    master: Dict[str, torch.Tensor],
    grad_outputs: None,
    device: torch.device,
    flush: Callable[[], None],
    repeats: int,
) -> None:
    """``trace_phases`` for an op without a backward: ``repeats`` forward calls as "full" regions."""
    for i in range(repeats):
        inputs = fresh_inputs(master)
        _settle(flush, device)
        with trace.region(region_name(impl, "full", i)):
            out = call(**inputs)
            synchronize(device)
        del inputs, out


def forward_device_times(regions: Dict[str, Tuple[float, int]], impl: str, repeats: int) -> DeviceTimes:
    """``device_times`` for the "full" regions of ``trace_forward``: the forward's times are the full ones."""
    found = _phase_repeats(regions, impl, "full", repeats, "forward")
    full_ms, events = [ms for ms, _ in found], [n for _, n in found]
    return DeviceTimes(
        fwd_ms=full_ms,
        bwd_ms=[],
        full_ms=full_ms,
        full_events=events,
        uneven_phases=["full"] if len(set(events)) > 1 else [],
    )


def pad_launches(device: torch.device, launches: int = PAD_LAUNCHES) -> None:
    """``launches`` throw-away kernels, finished: the head records a new profiler session returns with
    timestamps from another clock (pytorch/pytorch#192021) land on them, not on measured work."""
    scratch = torch.zeros(1, device=device)
    for _ in range(launches):
        scratch.add_(1.0)
    synchronize(device)


def pad_session_head(trace, device: torch.device, launches: int) -> None:
    with trace.region(PAD_REGION):
        pad_launches(device, launches)
