"""What every row of one kernels-suite run shares: ids, device, settings, the L2 flush, copy bandwidth,
the compile cache and the timer / profiler factories (the event and device passes read it; rows stamp it)."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from optkit.bench.kernels.impls import CompileCache
from optkit.measure.device_timing import Settings
from optkit.measure.timing import PhaseTimer


@dataclass
class RunContext:
    run_id: str
    device: torch.device
    env: Dict[str, Any]
    env_fields: Dict[str, Any]
    settings: Settings
    flush: Any
    copy_gbps: Optional[float]
    compile_cache: CompileCache
    timer_factory: Callable[[torch.device], Any] = PhaseTimer
    trace_factory: Optional[Callable[[], Any]] = None  # a profiler session (ProfilerTrace); None: no device pass
    trace_sessions: int = 0  # profiler sessions opened so far in this process
    device_note: Optional[str] = None  # device_error of ok rows until the device pass fills them


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 2000 else text[:2000] + " ..."


def release_after_failure(device: torch.device) -> None:
    """A failed impl may leave cycles (frames, compiled graphs) pinning device memory: collect them.
    Not done after ok rows: gc.collect costs ~0.1-0.5 s with torch loaded, and refcounts free those."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
