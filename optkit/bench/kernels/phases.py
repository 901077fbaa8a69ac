"""How the kernels suite steps an op in its two passes, by the op's phases: ``FORWARD_BACKWARD`` (every
op with a backward) or ``FORWARD_ONLY`` (``OpSpec.forward_only``: NF4 dequantize, whose quantized weight
is frozen). ``phases_of(spec)`` picks one; optkit/bench/kernels/run.py calls its four steps.

Both are timed by optkit/measure/device_timing.py (event pass: ``measure`` / ``measure_forward``) and
optkit/measure/device_trace.py (device pass). A forward-only op is timed the same way (every repeat on
fresh copies of the inputs, from a cold L2; warm-up by steps and by time; the allocator peak of one
call), with the forward as its "full" phase: the event pass times one loop of forward calls
(``fwd_ms`` = ``full_ms``), the device pass traces "full" regions only, and the row's backward fields
stay None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from optkit.bench.kernels.ops import OpSpec
from optkit.measure.device_timing import (
    Measurement,
    clone_all,
    first_step,
    forward_backward,
    fresh_inputs,
    measure,
    measure_forward,
)
from optkit.measure.device_trace import DeviceTimes, device_times, forward_device_times, trace_forward, trace_phases

Inputs = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Phases:
    """The four steps of both passes, with the signatures of device_timing's and device_trace's."""

    measure: Callable[..., Measurement]  # (call, master, device, settings, flush, timer_factory)
    warm_up: Callable[..., Any]  # (call, master, steps) -> grad_outputs the trace reuses
    trace: Callable[..., None]  # (trace, impl, call, master, grad_outputs, device, flush, repeats)
    device_times: Callable[..., DeviceTimes]  # (regions, impl, repeats)


def _warm_up_forward_backward(call: Callable, master: Inputs, steps: int) -> Optional[Tuple[torch.Tensor, ...]]:
    grad_outputs = first_step(call, master)
    for _ in range(steps):
        forward_backward(call, fresh_inputs(master), clone_all(grad_outputs))
    return grad_outputs


def _warm_up_forward(call: Callable, master: Inputs, steps: int) -> None:
    for _ in range(1 + steps):  # the first call (compile / JIT) and the warm-up ones
        call(**fresh_inputs(master))


FORWARD_BACKWARD = Phases(measure, _warm_up_forward_backward, trace_phases, device_times)
FORWARD_ONLY = Phases(measure_forward, _warm_up_forward, trace_forward, forward_device_times)


def phases_of(spec: OpSpec) -> Phases:
    return FORWARD_ONLY if spec.forward_only else FORWARD_BACKWARD
