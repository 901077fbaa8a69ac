"""The kernels suite's device pass: profiler device time of every ok row, after all event timing.

Why it comes last and traces a whole case per session: a profiler session leaves CUPTI attached to the
process, which slows later kernel launches (pytorch/pytorch#144455), so no event-timed row may follow one;
and each new session in a process returns a few kernel records at its head with timestamps from another
clock (pytorch/pytorch#192021), so sessions are few, each starts with a burst of throw-away launches, and
a session whose burst was entirely lost gives no device times (``device_error`` says so).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from optkit.bench.kernels.cases import DTYPES, Case
from optkit.bench.kernels.context import RunContext, error_text, release_after_failure
from optkit.bench.kernels.impls import resolve_impl
from optkit.bench.kernels.ops import SPECS
from optkit.bench.kernels.phases import Phases, phases_of
from optkit.bench.kernels.rows import fill_device
from optkit.measure.device_trace import (
    PAD_LAUNCHES,
    PAD_REGION,
    DeviceTraceError,
    device_time_by_region,
    pad_session_head,
)


def _warm_up_for_trace(
    case: Case,
    rows: Sequence[Dict[str, Any]],
    master: Dict[str, torch.Tensor],
    context: RunContext,
    errors: Dict[str, str],
) -> List[Tuple[Dict[str, Any], Callable, Any]]:
    """(row, call, grad_outputs) of each impl that warms up again; a failure goes to ``errors``."""
    spec, device = SPECS[case.op], context.device
    traced = []
    for row in rows:
        try:
            call = resolve_impl(row["impl"], spec, case, device, context.compile_cache, DTYPES[row["dtype"]])
            grad_outputs = phases_of(spec).warm_up(call, master, context.settings.device_warmup_steps)
            traced.append((row, call, grad_outputs))
        except Exception as exc:  # it ran in the event pass; say what changed rather than stop
            errors[row["impl"]] = f"device pass warm-up: {error_text(exc)}"
    return traced


def _trace_session(
    phases: Phases, traced, master: Dict[str, torch.Tensor], context: RunContext, pad: int, errors: Dict[str, str]
) -> Dict[str, Tuple[float, int]]:
    """One profiler session: the head pad, then every phase of every impl; returns its regions."""
    context.trace_sessions += 1
    with context.trace_factory() as trace:
        pad_session_head(trace, context.device, pad)
        for row, call, grad_outputs in traced:
            if row["impl"] in errors:
                continue
            try:
                phases.trace(
                    trace,
                    row["impl"],
                    call,
                    master,
                    grad_outputs,
                    context.device,
                    context.flush,
                    context.settings.device_repeats,
                )
            except Exception as exc:
                errors[row["impl"]] = f"device pass: {error_text(exc)}"
    return device_time_by_region(trace.events())


def measure_device_case(
    case: Case, dtype_name: str, rows: Sequence[Dict[str, Any]], context: RunContext, log: Callable[[str], None]
) -> None:
    """Device times of a case's ok rows: warm each impl up, then trace them all in one session (a second,
    with a longer head pad, if the first lost the whole pad)."""
    torch.manual_seed(0)
    spec = SPECS[case.op]
    master, phases = spec.make_inputs(case, DTYPES[dtype_name], context.device), phases_of(spec)
    errors: Dict[str, str] = {}
    traced = _warm_up_for_trace(case, rows, master, context, errors)
    pad = PAD_LAUNCHES + 2 * context.trace_sessions
    regions, pad_seen = {}, 0
    for attempt in range(2 if traced else 0):
        regions = _trace_session(phases, traced, master, context, pad, errors)
        pad_seen = regions.get(PAD_REGION, (0.0, 0))[1]
        if pad_seen:
            break
        log(
            f"  profiler session {context.trace_sessions} lost all {pad} head launches (pytorch#192021)"
            + ("; tracing the case again with a longer pad" if attempt == 0 else "")
        )
        pad *= 8
    del traced, master
    if errors:
        release_after_failure(context.device)
    if 0 < pad_seen < pad:
        log(
            f"  profiler session {context.trace_sessions}: {pad - pad_seen} of the {pad} head launches came back "
            "without a usable timestamp (pytorch#192021); the head pad absorbed them"
        )
    for row in rows:
        if row["impl"] in errors:
            row["device_error"] = errors[row["impl"]]
        elif pad_seen == 0:
            row["device_error"] = (
                "two profiler sessions lost their whole head pad (pytorch#192021 or no CUPTI), "
                "so the op's own records may be missing too: no device time"
            )
        else:
            try:
                times = phases.device_times(regions, row["impl"], context.settings.device_repeats)
            except DeviceTraceError as exc:
                row["device_error"] = str(exc)
                continue
            fill_device(row, times, context.copy_gbps)
            if times.uneven_phases:  # a deterministic op launches the same kernels every time
                log(
                    f"  {row['point_key']}: device-event count varies over the {'/'.join(times.uneven_phases)} "
                    "repeats (records lost?); the medians are kept"
                )


def run_device_pass(
    case_rows: Sequence[Tuple[Case, str, List[Dict[str, Any]]]], context: RunContext, log: Callable[[str], None]
) -> None:
    """The profiler pass over every case's ok rows (after all event timing: see the module doc)."""
    for case, dtype_name, rows in case_rows:
        ok = [r for r in rows if r["status"] == "ok"]
        if not ok:
            continue
        failure = None
        try:
            measure_device_case(case, dtype_name, ok, context, log)
        except Exception as exc:  # inputs that no longer fit, a profiler that fails: rows keep event times
            failure = f"device pass: {error_text(exc)}"
        if failure is not None:
            release_after_failure(context.device)
            for row in ok:
                if row["full_device_ms"] is None:
                    row["device_error"] = failure
        for row in ok:
            timing = (
                f"device {row['full_device_ms']:.3f} ms, {row['n_kernels_full']} kernels"
                if row["full_device_ms"] is not None
                else (row["device_error"] or "")[:100]
            )
            log(f"  {row['point_key']:<60} {timing}")
