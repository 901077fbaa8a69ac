"""GPU memory, energy, clocks and throttling from NVML, sampled by a background thread.

Why NVML beside the torch allocator: NVML "used" also holds the CUDA context, cuBLAS workspaces
and CUDA managed memory (bitsandbytes' paged optimizers), which the allocator never sees. Why a
thread: a peak only exists while the step runs; polling every ~10 ms can still miss a spike
shorter than that, which is why the allocator's own peak is recorded beside it.

Everything degrades to ``available=False`` plus a ``reason`` (no pynvml, no driver, no GPU):
the sampler never raises on a machine without NVML. Per-process memory is often unavailable in
containers, where NVML reports host PIDs: then ``process_bytes_source="unavailable"`` and the
device figures (and their delta over the baseline) are the ones to read.

Cost: each sample is 3-4 NVML calls (ctypes releases the GIL during them); the thread holds the
GIL only briefly every ``interval_ms``.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from optkit.measure.energy import energy_delta_mj, read_energy_mj

# NVML clock-event ("throttle") reason bits, stable across driver versions (nvml.h).
_THROTTLE_BITS = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)
# The reasons that mean the clocks were pulled below what was asked for: a point measured under
# one of these is marked throttled. Idle, sync boost and clock settings are not slowdowns.
PERF_LIMITING_REASONS = frozenset(
    {"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"}
)
_KNOWN_BITS = sum(bit for bit, _ in _THROTTLE_BITS)
_NVML_CLOCK_SM = 1
_NVML_CLOCK_MEM = 2
MAX_SERIES_POINTS = 2000


def decode_throttle_reasons(mask: int) -> list[str]:
    """Names of the bits set in an NVML clocks-event-reasons mask (unknown bits as hex)."""
    names = [name for bit, name in _THROTTLE_BITS if mask & bit]
    unknown = mask & ~_KNOWN_BITS
    if unknown:
        names.append(f"unknown_{unknown:#x}")
    return names


def downsample_keep_peaks(t_ms: list[float], values: list[int], max_points: int = MAX_SERIES_POINTS):
    """At most ``max_points`` points: the max of each bucket (with its time), so peaks survive."""
    n = len(values)
    if n <= max_points:
        return list(t_ms), list(values)
    out_t, out_v = [], []
    for b in range(max_points):
        lo, hi = b * n // max_points, (b + 1) * n // max_points
        i = max(range(lo, hi), key=values.__getitem__)
        out_t.append(t_ms[i])
        out_v.append(values[i])
    return out_t, out_v


def load_nvml() -> tuple[Any, Optional[str]]:
    """(pynvml module initialised, None) or (None, reason). Pair with ``pynvml.nvmlShutdown()``."""
    try:
        import pynvml
    except Exception as exc:  # ImportError, or a broken install
        return None, f"pynvml not importable ({exc}); install nvidia-ml-py"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / NoPermission ...
        return None, f"nvmlInit failed: {exc}"
    return pynvml, None


def handle_for_cuda_index(pynvml, cuda_index: int):
    """NVML handle of the device torch calls ``cuda:<cuda_index>``.

    NVML numbers physical devices; CUDA numbers the ones CUDA_VISIBLE_DEVICES lets through, by
    index or by UUID. Without that variable the two numberings agree (CUDA_DEVICE_ORDER aside).
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if cuda_index >= len(entries):
        raise ValueError(f"cuda:{cuda_index} not visible with CUDA_VISIBLE_DEVICES={visible!r}")
    entry = entries[cuda_index]
    if entry.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
    return pynvml.nvmlDeviceGetHandleByUUID(entry)


def as_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def try_call(fn, *args):
    """fn(*args), or None when NVML says the query is unsupported on this GPU / driver."""
    try:
        return fn(*args)
    except Exception:
        return None


def read_memory(pynvml, handle) -> tuple[int, Optional[int], int, int]:
    """(used_bytes, driver_reserved_bytes or None, total_bytes, info_version).

    v2 separates driver-reserved memory from "used"; older drivers / bindings only have v1.
    """
    version_tag = getattr(pynvml, "nvmlMemory_v2", None)
    if version_tag is not None:
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=version_tag)
            return int(info.used), int(info.reserved), int(info.total), 2
        except Exception:
            pass
    info = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return int(info.used), None, int(info.total), 1


def list_processes(pynvml, handle) -> Optional[list[dict]]:
    """Compute processes on the device as [{pid, used_bytes}], or None if NVML cannot say."""
    procs = try_call(pynvml.nvmlDeviceGetComputeRunningProcesses, handle)
    if procs is None:
        return None
    return [{"pid": int(p.pid), "used_bytes": None if p.usedGpuMemory is None else int(p.usedGpuMemory)} for p in procs]


def read_throttle_mask(pynvml, handle) -> Optional[int]:
    for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
        fn = getattr(pynvml, name, None)
        if fn is not None:
            mask = try_call(fn, handle)
            if mask is not None:
                return int(mask)
    return None


def query_once(device_index: int, read: Callable[[Any, Any], Any]):
    """``read(pynvml, handle)`` inside its own nvmlInit / nvmlShutdown; None if NVML can't answer."""
    pynvml, _ = load_nvml()
    if pynvml is None:
        return None
    try:
        return read(pynvml, handle_for_cuda_index(pynvml, device_index))
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def gpu_processes(device_index: int = 0) -> Optional[list[dict]]:
    """Processes on ``cuda:<device_index>`` now (call before a point starts), or None."""
    return query_once(device_index, list_processes)


def device_used_bytes(device_index: int = 0) -> Optional[int]:
    """NVML "used" of the device now, e.g. right after CUDA init (the context baseline)."""
    return query_once(device_index, lambda nv, handle: read_memory(nv, handle)[0])


@dataclass
class NvmlReport:
    available: bool
    reason: Optional[str] = None  # why not available
    device_index: int = 0
    device_name: Optional[str] = None
    memory_info_version: Optional[int] = None  # 2: "used" excludes driver-reserved memory
    device_total_bytes: Optional[int] = None
    device_reserved_bytes: Optional[int] = None  # driver-reserved (v2 only)
    baseline_device_used_bytes: Optional[int] = None  # right after start()
    peak_device_used_bytes: Optional[int] = None
    peak_device_delta_bytes: Optional[int] = None  # peak minus baseline
    baseline_process_used_bytes: Optional[int] = None
    peak_process_used_bytes: Optional[int] = None
    process_bytes_source: str = "unavailable"  # "nvml_process" | "unavailable" (read the device figures)
    n_samples: int = 0
    interval_ms: float = 0.0
    duration_ms: float = 0.0
    series_t_ms: list = field(default_factory=list)  # downsampled to <= 2000 points, max per bucket
    series_used_bytes: list = field(default_factory=list)
    energy_mj: Optional[int] = None  # delta of the cumulative energy counter over start..stop
    sm_clock_mhz_start: Optional[int] = None
    sm_clock_mhz_stop: Optional[int] = None
    sm_clock_mhz_min: Optional[int] = None  # lowest SM clock seen while sampling
    mem_clock_mhz_start: Optional[int] = None
    mem_clock_mhz_stop: Optional[int] = None
    throttle_reasons_start: Optional[list] = None
    throttle_reasons_stop: Optional[list] = None
    throttle_reasons_seen: list = field(default_factory=list)  # union over start, every sample, stop
    throttled: Optional[bool] = None  # a performance-limiting reason was seen while sampling
    other_processes_at_start: Optional[list] = None  # [{pid, used_bytes}], this PID excluded
    errors: list = field(default_factory=list)  # non-fatal NVML errors while sampling

    def to_dict(self) -> dict:
        return asdict(self)


class NvmlSampler:
    """Sample NVML in a background thread between ``start()`` and ``stop()``; also a context manager.

    >>> with NvmlSampler(device_index=0) as s:
    ...     run_steps()
    >>> s.report.peak_device_used_bytes
    """

    def __init__(self, device_index: int = 0, interval_ms: float = 10.0):
        if interval_ms <= 0:
            raise ValueError(f"interval_ms must be > 0, got {interval_ms}")
        self.device_index = device_index
        self.interval_ms = float(interval_ms)
        self.report: Optional[NvmlReport] = None
        self._nvml = None
        self._handle = None
        self._thread: Optional[threading.Thread] = None
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._t0_ns = 0
        self._t_ms: list[float] = []
        self._used: list[int] = []
        self._peak_process: Optional[int] = None
        self._sm_clock_min: Optional[int] = None
        self._reasons_seen: set[str] = set()
        self._mask_readable = False
        self._energy_start: Optional[int] = None
        self._energy_at: dict[float, Optional[int]] = {}  # mark (now_ms) -> energy counter, mJ
        self._track_process = False
        self._pid = os.getpid()
        self._report: Optional[NvmlReport] = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "NvmlSampler":
        if self._thread is not None or self._nvml is not None:
            raise RuntimeError("NvmlSampler.start() called twice; create a new sampler per measured window")
        self._report = NvmlReport(available=False, device_index=self.device_index, interval_ms=self.interval_ms)
        pynvml, reason = load_nvml()
        if pynvml is None:
            self._report.reason = reason
            return self
        try:
            self._handle = handle_for_cuda_index(pynvml, self.device_index)
            self._nvml = pynvml
            self._read_start_state()
        except Exception as exc:
            self._report.reason = f"NVML device query failed: {exc}"
            self._nvml = None
            pynvml.nvmlShutdown()
            return self
        self._report.available = True
        self._thread = threading.Thread(target=self._run, name="optkit-nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> NvmlReport:
        if self._report is None:
            raise RuntimeError("NvmlSampler.stop() before start()")
        if self._nvml is None:  # unavailable, or already stopped
            self.report = self._report
            return self._report
        self._stop_event.set()
        self._thread.join()
        self._sample()  # one last point at the end of the window
        try:
            self._read_stop_state()
        finally:
            self._nvml.nvmlShutdown()
            self._nvml = None
        self.report = self._report
        return self._report

    def __enter__(self) -> "NvmlSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- marks on the series' clock
    def now_ms(self) -> Optional[float]:
        """Now, in ms on the clock of ``series_t_ms`` (ms since sampling began); None if not sampling.

        Mark a window with it (before its first step, after its last synchronize) to cut the series
        or take a peak over that window only. While sampling, a mark also reads the energy counter,
        so ``energy_between`` two marks is the window's own energy (measure/energy.py)."""
        if not self._t0_ns:
            return None
        t_ms = (time.perf_counter_ns() - self._t0_ns) / 1e6
        if self._nvml is not None:
            self._energy_at[t_ms] = read_energy_mj(self._nvml, self._handle)
        return t_ms

    def energy_between(self, start_ms: float, end_ms: float) -> Optional[int]:
        """mJ the device used between two marks ``now_ms`` returned; None without a counter reading at both."""
        return energy_delta_mj(self._energy_at.get(start_ms), self._energy_at.get(end_ms))

    def samples_between(self, start_ms: float, end_ms: float) -> list[list]:
        """Every raw sample [t_ms, device used bytes] with start_ms <= t_ms <= end_ms (not downsampled)."""
        with self._lock:
            return [[t, used] for t, used in zip(self._t_ms, self._used) if start_ms <= t <= end_ms]

    def peak_device_used_between(self, start_ms: float, end_ms: float) -> Optional[int]:
        """Peak device-wide used bytes over [start_ms, end_ms]; None when no sample fell inside it."""
        used = [b for _, b in self.samples_between(start_ms, end_ms)]
        return max(used) if used else None

    # ----------------------------------------------------------------- reading
    def _read_start_state(self) -> None:
        nv, h, r = self._nvml, self._handle, self._report
        name = try_call(nv.nvmlDeviceGetName, h)
        r.device_name = None if name is None else as_str(name)
        used, reserved, total, version = read_memory(nv, h)
        r.baseline_device_used_bytes, r.device_reserved_bytes = used, reserved
        r.device_total_bytes, r.memory_info_version = total, version
        procs = list_processes(nv, h)
        if procs is not None:
            mine = [p for p in procs if p["pid"] == self._pid]
            r.other_processes_at_start = [p for p in procs if p["pid"] != self._pid]
            if mine and mine[0]["used_bytes"] is not None:
                r.baseline_process_used_bytes = mine[0]["used_bytes"]
            # Keep asking while sampling: this process may create its CUDA context after start().
            self._track_process = True
        self._energy_start = try_call(nv.nvmlDeviceGetTotalEnergyConsumption, h)
        r.sm_clock_mhz_start = try_call(nv.nvmlDeviceGetClockInfo, h, _NVML_CLOCK_SM)
        r.mem_clock_mhz_start = try_call(nv.nvmlDeviceGetClockInfo, h, _NVML_CLOCK_MEM)
        r.throttle_reasons_start = self._read_reasons()
        self._t0_ns = time.perf_counter_ns()
        self.record(used, 0.0)

    def _read_stop_state(self) -> None:
        nv, h, r = self._nvml, self._handle, self._report
        energy_end = try_call(nv.nvmlDeviceGetTotalEnergyConsumption, h)
        if self._energy_start is not None and energy_end is not None:
            r.energy_mj = int(energy_end - self._energy_start)
        r.sm_clock_mhz_stop = try_call(nv.nvmlDeviceGetClockInfo, h, _NVML_CLOCK_SM)
        r.mem_clock_mhz_stop = try_call(nv.nvmlDeviceGetClockInfo, h, _NVML_CLOCK_MEM)
        r.throttle_reasons_stop = self._read_reasons()
        with self._lock:
            r.n_samples = len(self._used)
            r.duration_ms = (time.perf_counter_ns() - self._t0_ns) / 1e6
            r.peak_device_used_bytes = max(self._used)
            r.peak_device_delta_bytes = r.peak_device_used_bytes - r.baseline_device_used_bytes
            r.series_t_ms, r.series_used_bytes = downsample_keep_peaks(self._t_ms, self._used)
            r.peak_process_used_bytes = self._peak_process
            r.sm_clock_mhz_min = self._sm_clock_min
            r.throttle_reasons_seen = sorted(self._reasons_seen)
        if r.peak_process_used_bytes is not None:
            r.process_bytes_source = "nvml_process"
        if self._mask_readable:
            r.throttled = bool(set(r.throttle_reasons_seen) & PERF_LIMITING_REASONS)

    def _read_reasons(self) -> Optional[list]:
        """Current throttle reasons, also added to the union seen over the window."""
        mask = read_throttle_mask(self._nvml, self._handle)
        if mask is None:
            return None
        names = decode_throttle_reasons(mask)
        with self._lock:
            self._mask_readable = True
            self._reasons_seen.update(names)
        return names

    def record(self, used: int, t_ms: float) -> None:
        with self._lock:
            self._t_ms.append(t_ms)
            self._used.append(used)

    def _note_error(self, what: str, exc: Exception) -> None:
        msg = f"{what}: {exc}"
        if msg not in self._report.errors:
            self._report.errors.append(msg)

    def _sample(self) -> None:
        nv, h = self._nvml, self._handle
        try:
            used = read_memory(nv, h)[0]
        except Exception as exc:
            self._note_error("memory info", exc)
            return
        self.record(used, (time.perf_counter_ns() - self._t0_ns) / 1e6)
        if self._track_process:
            self._sample_process()
        self._read_reasons()
        sm = try_call(nv.nvmlDeviceGetClockInfo, h, _NVML_CLOCK_SM)
        if sm is not None:
            with self._lock:
                self._sm_clock_min = sm if self._sm_clock_min is None else min(self._sm_clock_min, sm)

    def _sample_process(self) -> None:
        procs = list_processes(self._nvml, self._handle)
        if procs is None:
            self._track_process = False  # unsupported: stop paying for the call
            return
        for p in procs:
            if p["pid"] == self._pid and p["used_bytes"] is not None:
                with self._lock:
                    prev = self._peak_process
                    self._peak_process = p["used_bytes"] if prev is None else max(prev, p["used_bytes"])

    def _run(self) -> None:
        interval_s = self.interval_ms / 1e3
        while not self._stop_event.wait(interval_s):
            self._sample()
