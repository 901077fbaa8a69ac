"""NvmlSampler without NVML, and with a scripted stand-in for pynvml (plus env's NVML path)."""

import os
import sys
import threading
import time
import types

import pytest
import torch

from optkit.measure import env as env_mod
from optkit.measure.nvml import (
    NvmlSampler,
    decode_throttle_reasons,
    downsample_keep_peaks,
    gpu_processes,
    handle_for_cuda_index,
)

GIB = 2**30


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """Just enough of pynvml; the test moves ``used`` / ``procs`` while the sampler runs."""

    def __init__(self, *, v2=True, processes=True, energy=True):
        self.used, self.total, self.reserved = 1 * GIB, 80 * GIB, GIB // 2
        self.procs = []  # [(pid, bytes)]
        self.throttle_mask = 0x1  # gpu_idle
        self.energy_mj = 1_000_000
        self.memory_calls = 0
        self.inits = self.shutdowns = 0
        self.lock = threading.Lock()
        self.v2, self.processes, self.energy = v2, processes, energy

    def module(self):
        mod = types.ModuleType("pynvml")
        mod.NVMLError = FakeNvmlError
        if self.v2:
            mod.nvmlMemory_v2 = 0x02000028
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(mod, name, getattr(self, name))
        return mod

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("idx", index)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return ("uuid", uuid)

    def nvmlDeviceGetName(self, handle):
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        if version is not None and not self.v2:
            raise FakeNvmlError("Function Not Found")
        with self.lock:
            self.memory_calls += 1
            return types.SimpleNamespace(
                used=self.used, total=self.total, free=self.total - self.used, reserved=self.reserved
            )

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        if not self.processes:
            raise FakeNvmlError("Not Supported")
        with self.lock:
            return [types.SimpleNamespace(pid=pid, usedGpuMemory=b) for pid, b in self.procs]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.energy:
            raise FakeNvmlError("Not Supported")
        self.energy_mj += 10
        return self.energy_mj

    def nvmlDeviceGetClockInfo(self, handle, clock_type):
        return 1980 if clock_type == 1 else 2619

    def nvmlDeviceGetMaxClockInfo(self, handle, clock_type):
        return 1980 if clock_type == 1 else 2619

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return self.throttle_mask

    def nvmlSystemGetDriverVersion(self):
        return "580.65.06"

    def nvmlSystemGetCudaDriverVersion(self):
        return 13000

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return (9, 0)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000  # mW

    def nvmlDeviceGetEccMode(self, handle):
        return [1, 1]

    def nvmlDeviceGetMigMode(self, handle):
        raise FakeNvmlError("Not Supported")

    def nvmlDeviceGetCount(self):
        return 8

    def wait_for_samples(self, n=3, timeout_s=5.0):
        """Block until the sampler thread has read memory ``n`` more times."""
        start = self.memory_calls
        deadline = time.monotonic() + timeout_s
        while self.memory_calls < start + n:
            assert time.monotonic() < deadline, "sampler thread stopped sampling"
            time.sleep(0.001)


@pytest.fixture
def fake(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def _run_window(fake, peak_used, peak_proc_bytes=None, mask=None):
    sampler = NvmlSampler(device_index=0, interval_ms=1.0).start()
    fake.wait_for_samples()
    with fake.lock:
        fake.used = peak_used
        if peak_proc_bytes is not None:
            fake.procs = [(os.getpid(), peak_proc_bytes), (4242, 3 * GIB)]
        if mask is not None:
            fake.throttle_mask = mask
    fake.wait_for_samples()
    with fake.lock:
        fake.used = 2 * GIB
        fake.throttle_mask = 0x1
    fake.wait_for_samples()
    return sampler.stop()


def test_without_nvml_library_reports_unavailable_cleanly():
    if torch.cuda.is_available():
        pytest.skip("this machine has NVML")
    report = NvmlSampler().start().stop()
    assert report.available is False and "nvml" in report.reason.lower()
    assert report.peak_device_used_bytes is None and report.process_bytes_source == "unavailable"


def test_without_pynvml_module_reports_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    with NvmlSampler() as sampler:
        pass
    assert sampler.report.available is False and "nvidia-ml-py" in sampler.report.reason
    assert gpu_processes() is None


def test_peak_device_and_process_bytes(fake):
    fake.procs = [(4242, 3 * GIB)]  # another process holds memory before we start
    report = _run_window(fake, peak_used=9 * GIB, peak_proc_bytes=5 * GIB)
    assert report.available and report.reason is None
    assert report.device_name == "NVIDIA H100 80GB HBM3" and report.memory_info_version == 2
    assert report.baseline_device_used_bytes == 1 * GIB
    assert report.peak_device_used_bytes == 9 * GIB
    assert report.peak_device_delta_bytes == 8 * GIB
    assert report.device_reserved_bytes == GIB // 2 and report.device_total_bytes == 80 * GIB
    assert report.peak_process_used_bytes == 5 * GIB
    assert report.process_bytes_source == "nvml_process"
    assert report.other_processes_at_start == [{"pid": 4242, "used_bytes": 3 * GIB}]
    assert report.n_samples >= 9 and max(report.series_used_bytes) == 9 * GIB
    assert len(report.series_t_ms) == len(report.series_used_bytes) <= 2000
    assert report.series_t_ms == sorted(report.series_t_ms)
    assert report.energy_mj == 10  # two reads of a counter that grows 10 mJ per read
    assert report.sm_clock_mhz_start == 1980 and report.mem_clock_mhz_stop == 2619
    assert report.throttle_reasons_start == ["gpu_idle"] and report.throttled is False
    assert fake.inits == fake.shutdowns == 1


def test_container_host_pids_fall_back_to_device_figures(fake):
    report = _run_window(fake, peak_used=6 * GIB)  # our PID never appears in NVML's list
    assert report.peak_process_used_bytes is None
    assert report.process_bytes_source == "unavailable"
    assert report.peak_device_delta_bytes == 5 * GIB


def test_unsupported_queries_degrade_field_by_field(monkeypatch):
    fake = FakeNvml(v2=False, processes=False, energy=False)
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    report = _run_window(fake, peak_used=4 * GIB)
    assert report.available and report.memory_info_version == 1 and report.device_reserved_bytes is None
    assert report.other_processes_at_start is None and report.process_bytes_source == "unavailable"
    assert report.energy_mj is None
    assert report.peak_device_used_bytes == 4 * GIB


def test_throttling_during_the_window_is_marked(fake):
    report = _run_window(fake, peak_used=3 * GIB, mask=0x4 | 0x40)  # power cap + HW thermal
    assert report.throttled is True
    assert {"sw_power_cap", "hw_thermal_slowdown"} <= set(report.throttle_reasons_seen)
    assert report.throttle_reasons_stop == ["gpu_idle"]


def test_peak_over_a_marked_window_excludes_what_came_before(fake):
    """A spike before the window (QLoRA's bf16 model before quantizing) is not the window's peak."""
    sampler = NvmlSampler(device_index=0, interval_ms=1.0)
    assert sampler.now_ms() is None, "no clock before start()"
    sampler.start()
    with fake.lock:
        fake.used = 12 * GIB  # the build's spike
    fake.wait_for_samples()
    with fake.lock:
        fake.used = 4 * GIB
    fake.wait_for_samples()
    start = sampler.now_ms()
    with fake.lock:
        fake.used = 5 * GIB
    fake.wait_for_samples()
    end = sampler.now_ms()
    fake.wait_for_samples()
    report = sampler.stop()
    assert 0 < start < end <= report.duration_ms
    assert report.peak_device_used_bytes == 12 * GIB
    assert sampler.peak_device_used_between(start, end) == 5 * GIB
    inside = sampler.samples_between(start, end)
    assert inside and all(start <= t <= end for t, _ in inside)
    assert {b for _, b in inside} <= {4 * GIB, 5 * GIB}
    assert sampler.peak_device_used_between(end + 1e6, end + 2e6) is None


def test_decode_and_downsample():
    assert decode_throttle_reasons(0) == []
    assert decode_throttle_reasons(0x4 | 0x100 | 0x10000) == [
        "sw_power_cap",
        "display_clock_setting",
        "unknown_0x10000",
    ]
    t = [float(i) for i in range(10_000)]
    v = [1] * 10_000
    v[7777] = 99  # a one-sample spike must survive downsampling
    ts, vs = downsample_keep_peaks(t, v)
    assert len(vs) == 2000 and max(vs) == 99 and ts[vs.index(99)] == 7777.0


def test_cuda_visible_devices_maps_to_nvml_handles(fake, monkeypatch):
    nv = sys.modules["pynvml"]
    assert handle_for_cuda_index(nv, 1) == ("idx", 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert handle_for_cuda_index(nv, 1) == ("idx", 5)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234abcd")
    assert handle_for_cuda_index(nv, 0) == ("uuid", "GPU-1234abcd")
    with pytest.raises(ValueError, match="not visible"):
        handle_for_cuda_index(nv, 1)


def test_env_reads_gpu_facts_from_nvml(fake, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    env = env_mod.capture_env()
    assert env["gpu_name"] == "NVIDIA H100 80GB HBM3" and env["gpu_count"] == 8
    assert env["driver_version"] == "580.65.06" and env["cuda_driver_version"] == "13.0"
    assert env["compute_capability"] == "9.0" and env["power_limit_w"] == 700.0
    assert env["ecc_enabled"] is True and env["mig_enabled"] is None  # unsupported query -> None
    assert env["sm_clock_max_mhz"] == 1980 and env["gpu_total_memory_bytes"] == 80 * GIB
    assert env_mod.gpu_slug(env) == "h100"
    assert fake.inits == fake.shutdowns
