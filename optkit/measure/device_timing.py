"""Event timing of one differentiable call: forward, backward and forward+backward, each repeat on
fresh inputs, from a cold L2, with a graph of its own.

``measure`` warms the call up (by steps and by time), takes the allocator peak of one
forward+backward, then times two loops with a ``PhaseTimer`` (CUDA events on the stream, or the
host clock on the CPU): forward+backward with a mark between the phases, and backward alone. Before
every timed repeat ``L2Flush`` writes a buffer of at least 2x the L2 size; every repeat gets fresh
copies of the inputs (an implementation that writes into its inputs cannot skew the next repeat)
and builds its own autograd graph; gradients come from ``torch.autograd.grad`` w.r.t. every
differentiable input (weights included), so nothing accumulates and no graph is replayed with
retain_graph. ``measure_copy_gbps`` gives the device's copy bandwidth the op's GB/s is set beside.

``measure_graph`` times the same call captured once into a CUDA graph and replayed (no host cost).
The profiler's device time of the same calls lives in optkit/measure/device_trace.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from optkit.measure.stats import percentile
from optkit.measure.timing import PhaseTimer, WallClock

COPY_BYTES = {"cuda": 1 << 30, "cpu": 16 << 20}  # copy-bandwidth buffer: >> L2 on any GPU
MIN_FLUSH_BYTES = 256 << 20  # triton.testing's flush size; 2x L2 when that is larger


@dataclass(frozen=True)
class Settings:
    """How long each implementation is measured; ``loop_ms`` of timed work per loop, clamped."""

    warmup_steps: int = 3  # at least this many forward+backward steps ...
    warmup_ms: float = 50.0  # ... and at least this much wall time (after the first, compiling, call)
    loop_ms: float = 200.0  # target timed work of each loop (full, backward-only)
    min_repeats: int = 20
    max_repeats: int = 200
    max_warmup_steps: int = 50
    device_repeats: int = 5  # profiled repeats per phase in the device pass; 0 skips that pass
    device_warmup_steps: int = 2  # forward+backward steps before the profiler session (after the first)


def fresh_inputs(master: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Copies of the inputs, leaves again, with the strides of the master copies."""
    return {name: t.detach().clone().requires_grad_(t.requires_grad) for name, t in master.items()}


def as_tuple(out) -> Tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def grad_outputs_like(outs: Tuple[torch.Tensor, ...]) -> Optional[Tuple[torch.Tensor, ...]]:
    """Random upstream gradients for tensor outputs; None (implicit 1) for a scalar loss."""
    if len(outs) == 1 and outs[0].numel() == 1:
        return None
    return tuple(torch.randn_like(o) for o in outs)


def clone_all(grads):
    return None if grads is None else tuple(g.clone() for g in grads)  # dy may be written in place


def backward_wrt_inputs(outs, inputs, grad_outputs) -> None:
    """Gradients of ``outs`` w.r.t. every differentiable input, returned and dropped: nothing accumulates."""
    wrt = [t for t in inputs.values() if t.requires_grad]
    torch.autograd.grad(outs, wrt, grad_outputs=grad_outputs)


def forward_backward(call: Callable, inputs: Dict[str, torch.Tensor], grad_outputs) -> None:
    """One untimed-by-itself step: a new graph, gradients w.r.t. every differentiable input."""
    backward_wrt_inputs(as_tuple(call(**inputs)), inputs, grad_outputs)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_step(call: Callable, master: Dict[str, torch.Tensor]) -> Optional[Tuple[torch.Tensor, ...]]:
    """The first forward+backward (compile / JIT); returns the upstream gradients every later step reuses."""
    inputs = fresh_inputs(master)
    outs = as_tuple(call(**inputs))
    torch.manual_seed(0)
    grad_outputs = grad_outputs_like(outs)
    backward_wrt_inputs(outs, inputs, clone_all(grad_outputs))
    return grad_outputs


class L2Flush:
    """Writes a buffer of >= 2x L2 (at least 256 MiB) so each repeat starts from DRAM."""

    def __init__(self, device: torch.device):
        self.nbytes = 0
        self._buffer = None
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
            self.nbytes = max(2 * l2, MIN_FLUSH_BYTES)
            self._buffer = torch.empty(self.nbytes, dtype=torch.int8, device=device)

    def __call__(self) -> None:
        if self._buffer is not None:
            self._buffer.zero_()


@dataclass
class Measurement:
    compile_s: float
    warmup_steps: int
    repeats: int
    fwd_ms: List[float]
    bwd_ms: List[float]
    full_ms: List[float]
    peak_bytes: Optional[int]
    peak_delta_bytes: Optional[int]
    peak_reserved_bytes: Optional[int]


def _peak_memory(
    prepare: Callable[[], Any], run: Callable[[Any], Any], device
) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """(peak, peak over what was allocated before, reserved peak) of one ``run(prepare())``; None off CUDA.
    The inputs ``prepare`` makes are allocated before the baseline, so the delta is the op's own memory."""
    if device.type != "cuda":
        return None, None, None
    prepared = prepare()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run(prepared)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak, peak - before, torch.cuda.max_memory_reserved(device)


def _warm_up(step: Callable[[], Any], device, settings: Settings) -> Tuple[int, int]:
    """Warm-up by steps and by time (after the first, compiling call); returns (steps, timed repeats).

    Its mean step (input copies included) sizes the timed loops. Each step is waited for: a host that
    queues ahead would see 50 ms pass only after the step cap (50 steps of a 50 ms op: 2.5 s of warm-up
    per impl)."""
    warm = WallClock(device).start()
    warm_started = time.perf_counter()
    steps = 1
    while steps < settings.max_warmup_steps:
        step()
        synchronize(device)
        steps += 1
        enough_time = (time.perf_counter() - warm_started) * 1e3 >= settings.warmup_ms
        if steps >= settings.warmup_steps and enough_time:
            break
    return steps, _repeats_for(warm.stop() / (steps - 1), settings)


def _repeats_for(step_ms: float, settings: Settings) -> int:
    wanted = math.ceil(settings.loop_ms / step_ms) if step_ms > 0 else settings.max_repeats
    return int(min(settings.max_repeats, max(settings.min_repeats, wanted)))


def measure(
    call: Callable,
    master: Dict[str, torch.Tensor],
    device: torch.device,
    settings: Settings,
    flush: Callable[[], None],
    timer_factory: Callable[[torch.device], Any] = PhaseTimer,
) -> Measurement:
    """Warm up, take the memory peak, then time the full loop and the backward-only loop."""
    first = WallClock(device).start()
    grad_outputs = first_step(call, master)
    compile_s = first.stop() / 1e3

    steps, repeats = _warm_up(
        lambda: forward_backward(call, fresh_inputs(master), clone_all(grad_outputs)), device, settings
    )
    peak, peak_delta, peak_reserved = _peak_memory(
        lambda: (fresh_inputs(master), clone_all(grad_outputs)),
        lambda prepared: forward_backward(call, *prepared),
        device,
    )

    full_timer = timer_factory(device)
    for _ in range(repeats):
        inputs, grads = fresh_inputs(master), clone_all(grad_outputs)
        flush()
        full_timer.begin_step()
        outs = as_tuple(call(**inputs))
        full_timer.mark("forward")
        backward_wrt_inputs(outs, inputs, grads)
        full_timer.mark("backward")
        full_timer.end_step()
        del inputs, outs, grads
    full = full_timer.results()

    bwd_timer = timer_factory(device)
    for _ in range(repeats):
        inputs, grads = fresh_inputs(master), clone_all(grad_outputs)
        outs = as_tuple(call(**inputs))
        flush()
        bwd_timer.begin_step()
        backward_wrt_inputs(outs, inputs, grads)
        bwd_timer.mark("backward")
        bwd_timer.end_step()
        del inputs, outs, grads
    bwd = bwd_timer.results()

    return Measurement(
        compile_s=compile_s,
        warmup_steps=steps,
        repeats=repeats,
        fwd_ms=[r["forward_ms"] for r in full],
        bwd_ms=[r["backward_ms"] for r in bwd],
        full_ms=[r["step_ms"] for r in full],
        peak_bytes=peak,
        peak_delta_bytes=peak_delta,
        peak_reserved_bytes=peak_reserved,
    )


def measure_forward(
    call: Callable,
    master: Dict[str, torch.Tensor],
    device: torch.device,
    settings: Settings,
    flush: Callable[[], None],
    timer_factory: Callable[[torch.device], Any] = PhaseTimer,
) -> Measurement:
    """``measure`` for an op without a backward (a frozen weight's dequantize): one timed loop of forward
    calls, which are the "full" phase too; the backward lists stay empty."""
    first = WallClock(device).start()
    call(**fresh_inputs(master))
    compile_s = first.stop() / 1e3
    steps, repeats = _warm_up(lambda: call(**fresh_inputs(master)), device, settings)
    peak, peak_delta, peak_reserved = _peak_memory(lambda: fresh_inputs(master), lambda inputs: call(**inputs), device)
    timer = timer_factory(device)
    for _ in range(repeats):
        inputs = fresh_inputs(master)
        flush()
        timer.begin_step()
        out = call(**inputs)
        timer.end_step()
        del inputs, out
    forward_ms = [r["step_ms"] for r in timer.results()]
    return Measurement(
        compile_s=compile_s,
        warmup_steps=steps,
        repeats=repeats,
        fwd_ms=forward_ms,
        bwd_ms=[],
        full_ms=forward_ms,
        peak_bytes=peak,
        peak_delta_bytes=peak_delta,
        peak_reserved_bytes=peak_reserved,
    )


class GraphUnavailable(Exception):
    """The call cannot be captured into a CUDA graph here (no CUDA); the row keeps its other times."""


def _refill(static: Dict[str, torch.Tensor], master: Dict[str, torch.Tensor], grads, static_grads) -> None:
    """The captured tensors get the master values again: a call may write into its inputs (in-place
    RoPE, Liger's cross entropy) or into dy, and every replay must start from the same data."""
    with torch.no_grad():
        for name, t in static.items():
            t.copy_(master[name])
        for g, static_g in zip(grads or (), static_grads or ()):
            static_g.copy_(g)


def measure_graph(
    call: Callable,
    master: Dict[str, torch.Tensor],
    device: torch.device,
    repeats: int,
    flush: Callable[[], None],
    forward_only: bool = False,
    timer_factory: Callable[[torch.device], Any] = PhaseTimer,
) -> List[float]:
    """Event time of each of ``repeats`` replays of one CUDA graph holding the call's forward+backward
    (its forward when ``forward_only``), from a cold L2.

    A replay launches the whole captured sequence at once, so host cost (Python, autograd, the
    launches) is gone and the time is the kernels plus the device's own gaps between them: set beside
    ``full_ms`` (same events, launched from the host) it says whether the op is launch-bound. Inputs
    are refilled from the master copies before each replay, outside the timed span, as the event
    pass gives every repeat fresh inputs. Warm-up on a side stream, then capture, as torch.cuda.graph
    asks; a call that syncs with the host cannot be captured and raises."""
    if device.type != "cuda":
        raise GraphUnavailable("CUDA graphs need CUDA; this run is on the CPU")
    grad_outputs = None if forward_only else first_step(call, master)
    static, static_grads = fresh_inputs(master), clone_all(grad_outputs)

    def step() -> None:
        if forward_only:
            call(**static)
        else:
            backward_wrt_inputs(as_tuple(call(**static)), static, static_grads)

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        # The first warm-up runs with host syncs turned into errors: a capture that fails on a sync
        # leaves CUDA's RNG in capture state, and every later randn in the process then fails.
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _refill(static, master, grad_outputs, static_grads)
            step()
        except RuntimeError as exc:
            raise GraphUnavailable(f"the call syncs with the host, so it cannot be captured: {exc}") from None
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        _refill(static, master, grad_outputs, static_grads)
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    _refill(static, master, grad_outputs, static_grads)
    with torch.cuda.graph(graph):
        step()
    timer = timer_factory(device)
    for _ in range(repeats):
        _refill(static, master, grad_outputs, static_grads)
        flush()
        timer.begin_step()
        graph.replay()
        timer.end_step()
    return [r["step_ms"] for r in timer.results()]  # the graph and its memory pool go with this frame


def measure_copy_gbps(
    device: torch.device, timer_factory: Callable[[torch.device], Any] = PhaseTimer, repeats: int = 20
) -> float:
    """Device copy bandwidth: median over ``repeats`` copies of a buffer >> L2, read + written bytes."""
    nbytes = COPY_BYTES["cuda" if device.type == "cuda" else "cpu"]
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    timer = timer_factory(device)
    for _ in range(repeats):
        timer.begin_step()
        dst.copy_(src)
        timer.end_step()
    median_ms = percentile(sorted(r["step_ms"] for r in timer.results()), 50)
    return 2 * nbytes / (median_ms * 1e-3) / 1e9
