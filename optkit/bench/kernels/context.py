"""What every row of one kernels-suite run shares: ids, device, settings, the L2 flush, copy bandwidth,
the compile cache and the timer / profiler factories (the event and device passes read it; rows stamp it)."""

from __future__ import annotations

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
