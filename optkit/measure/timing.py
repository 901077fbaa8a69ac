"""Time the phases of training steps without stalling the device.

On CUDA, ``PhaseTimer`` records one event on the current stream at the start of a step and one at
the end of every phase, and reads them all with a single synchronize in ``results()``: the host
keeps queueing work ahead of the GPU, exactly as in an untimed run. (``record_function`` cannot do
this split: backward kernels run on autograd's thread and escape it.) On CPU the work is
synchronous, so ``time.perf_counter_ns`` at the same points measures the same thing.

A phase is the interval from the previous mark (or the step's start) to ``mark(phase)``; a name
used twice in a step (gradient accumulation) adds up. Whatever runs between the last mark and
``end_step()`` is reported as ``other_ms``, so the phases always sum to ``step_ms`` exactly.

``WallClock`` is the host clock for things that are not steps: compile time, warm-up duration.
"""

from __future__ import annotations

import time
from typing import Optional, Union

import torch

RESERVED_PHASES = ("step", "other")


def _resolve(device: Union[torch.device, str]) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"PhaseTimer({device}): CUDA is not available; time on torch.device('cpu')")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


class PhaseTimer:
    """Per-step phase times: ``begin_step()``, ``mark("forward")`` ..., ``end_step()``, ``results()``."""

    def __init__(self, device: Union[torch.device, str]):
        self.device = _resolve(device)
        self._cuda = self.device.type == "cuda"
        self._pending: list[list[tuple[str, object]]] = []  # steps not yet converted to ms
        self._current: Optional[list[tuple[str, object]]] = None
        self._results: list[dict[str, float]] = []

    def _stamp(self):
        if not self._cuda:
            return time.perf_counter_ns()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def begin_step(self) -> None:
        if self._current is not None:
            raise RuntimeError("begin_step() called twice without end_step()")
        self._current = [("", self._stamp())]

    def mark(self, phase: str) -> None:
        """End the phase named ``phase`` now (e.g. "forward", "backward", "optimizer")."""
        if self._current is None:
            raise RuntimeError(f"mark({phase!r}) outside a step; call begin_step() first")
        if not phase or phase in RESERVED_PHASES:
            raise ValueError(f"phase name {phase!r} is reserved or empty; {RESERVED_PHASES} are taken")
        self._current.append((phase, self._stamp()))

    def end_step(self) -> None:
        if self._current is None:
            raise RuntimeError("end_step() without begin_step()")
        self._current.append(("other", self._stamp()))
        self._pending.append(self._current)
        self._current = None

    def reset(self) -> None:
        """Forget every step (e.g. the warm-up ones)."""
        if self._current is not None:
            raise RuntimeError("reset() inside a step; call end_step() first")
        self._pending.clear()
        self._results.clear()

    @property
    def n_steps(self) -> int:
        return len(self._results) + len(self._pending)

    def _elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end) if self._cuda else (end - start) / 1e6

    def results(self) -> list[dict[str, float]]:
        """One dict per finished step: ``<phase>_ms`` for each phase, ``other_ms`` and ``step_ms``.

        The only device synchronisation of the timer happens here, once per call.
        """
        if self._pending and self._cuda:
            torch.cuda.synchronize(self.device)
        for stamps in self._pending:
            row: dict[str, float] = {}
            for (_, start), (phase, end) in zip(stamps, stamps[1:]):
                key = f"{phase}_ms"
                row[key] = row.get(key, 0.0) + self._elapsed_ms(start, end)
            row["step_ms"] = self._elapsed_ms(stamps[0][1], stamps[-1][1])
            self._results.append(row)
        self._pending.clear()
        return [dict(r) for r in self._results]


class WallClock:
    """Host wall time of a block, in ms. With a CUDA ``device`` it synchronises at both ends, so
    queued device work is inside the interval (fine for compile / warm-up, never for steps).

    >>> with WallClock(device) as wc:
    ...     warm_up()
    >>> wc.elapsed_ms
    """

    def __init__(self, device: Union[torch.device, str, None] = None):
        self._sync_device = None
        if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
            self._sync_device = torch.device(device)
        self._start_ns: Optional[int] = None
        self.elapsed_ms: Optional[float] = None

    def _sync(self) -> None:
        if self._sync_device is not None:
            torch.cuda.synchronize(self._sync_device)

    def start(self) -> "WallClock":
        self._sync()
        self._start_ns = time.perf_counter_ns()
        return self

    def stop(self) -> float:
        if self._start_ns is None:
            raise RuntimeError("WallClock.stop() before start()")
        self._sync()
        self.elapsed_ms = (time.perf_counter_ns() - self._start_ns) / 1e6
        return self.elapsed_ms

    def __enter__(self) -> "WallClock":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
