"""On a real GPU: NVML sees a 4 GiB allocation, events time matmuls without stalling the host,
syncs are counted, the environment and its peak are known. Skipped without CUDA."""

import time

import pytest
import torch

from optkit.measure.env import capture_env, gpu_slug
from optkit.measure.gpu_specs import peak_tflops
from optkit.measure.memory import allocator_peaks, reset_allocator_peaks
from optkit.measure.nvml import NvmlSampler
from optkit.measure.syncs import count_device_syncs
from optkit.measure.timing import PhaseTimer

pytestmark = pytest.mark.gpu
GIB = 2**30
DEVICE = torch.device("cuda", 0)


def test_nvml_sampler_and_allocator_see_a_4gib_allocation():
    torch.empty(1, device=DEVICE)  # CUDA context first: the baseline should not include it
    torch.cuda.synchronize()
    reset_allocator_peaks(DEVICE)
    with NvmlSampler(device_index=0, interval_ms=5.0) as sampler:
        block = torch.empty(4 * GIB, dtype=torch.uint8, device=DEVICE)
        block.fill_(1)
        torch.cuda.synchronize()
        time.sleep(0.2)  # >> interval: several samples see the block
        del block
        torch.cuda.empty_cache()
        time.sleep(0.05)
    report = sampler.report
    print(report.to_dict() | {"series_t_ms": "...", "series_used_bytes": "..."})
    assert report.available, report.reason
    assert report.peak_device_delta_bytes >= 4 * GIB * 0.99
    assert max(report.series_used_bytes) == report.peak_device_used_bytes
    assert report.series_used_bytes[-1] < report.peak_device_used_bytes - 3 * GIB  # freed again
    if report.process_bytes_source == "nvml_process":
        assert report.peak_process_used_bytes >= 4 * GIB
    assert report.sm_clock_mhz_start and report.sm_clock_mhz_start > 0
    assert report.energy_mj is None or report.energy_mj > 0
    assert allocator_peaks(DEVICE)["peak_allocated_bytes"] >= 4 * GIB


def test_phase_timer_on_cuda_matmuls_without_per_step_sync():
    n = 8192
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):  # cuBLAS heuristics / workspace before timing
        a @ b
    torch.cuda.synchronize()
    timer = PhaseTimer(DEVICE)
    for _ in range(20):
        timer.begin_step()
        c = a @ b  # "forward": one matmul
        timer.mark("forward")
        c = a @ c
        c = c @ b  # "backward": two matmuls of the same size
        timer.mark("backward")
        a.mul_(1.0)  # "optimizer": one elementwise pass
        timer.mark("optimizer")
        timer.end_step()
    probe = torch.cuda.Event()
    probe.record()
    # The host queued 20 steps (~60 large matmuls) ahead of the GPU: no per-step synchronisation.
    assert not probe.query(), "the GPU had caught up with the host: something synchronised per step"
    rows = timer.results()
    assert len(rows) == 20
    for row in rows[2:]:
        phases = row["forward_ms"] + row["backward_ms"] + row["optimizer_ms"] + row["other_ms"]
        assert phases == pytest.approx(row["step_ms"], abs=0.01)
        assert 1.6 < row["backward_ms"] / row["forward_ms"] < 2.5
        peak = peak_tflops(torch.cuda.get_device_name(DEVICE), "bf16")
        if peak is not None:  # a matmul cannot beat the datasheet peak
            assert 2 * n**3 / (row["forward_ms"] / 1e3) / 1e12 < peak * 1.02
    print(rows[-1])


def test_count_device_syncs_on_cuda():
    x = torch.randn(4096, device=DEVICE)
    assert count_device_syncs(lambda: x * 2 + 1) == 0
    assert count_device_syncs(lambda: (x.sum().item(), x.max().item())) == 2
    assert count_device_syncs(lambda: x[x > 0]) >= 1  # boolean-mask indexing needs the count on host
    assert torch.cuda.get_sync_debug_mode() == 0


def test_env_on_gpu_knows_this_gpu():
    env = capture_env()
    print(
        {
            k: env[k]
            for k in (
                "gpu_name",
                "driver_version",
                "cuda_version",
                "sm_clock_max_mhz",
                "power_limit_w",
                "ecc_enabled",
                "mig_enabled",
                "git_sha",
            )
        }
    )
    assert env["gpu_count"] >= 1 and env["gpu_name"] and env["driver_version"]
    assert gpu_slug(env) != "cpu"
    if any(s in env["gpu_name"] for s in ("H100", "H200")):
        assert peak_tflops(env["gpu_name"], "bf16") is not None
