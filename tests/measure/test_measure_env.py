"""Environment capture without a GPU, GPU slugs and the peak table (NVML path: test_measure_nvml.py)."""

import json
import re

import pytest
import torch

from optkit.measure.env import capture_env, env_fingerprint, gpu_slug, package_version
from optkit.measure.gpu_specs import peak_memory_bandwidth_gbps, peak_tflops

# (name as torch / NVML report it, slug, dense bf16 peak or None = unknown)
REAL_NAMES = [
    ("NVIDIA H100 80GB HBM3", "h100", 989.4),
    ("NVIDIA H100 PCIe", "h100-pcie", 756.5),
    ("NVIDIA H100 NVL", "h100-nvl", 835.5),
    ("NVIDIA H200", "h200", 989.4),
    ("NVIDIA H200 NVL", "h200-nvl", 835.5),
    ("NVIDIA B200", "b200", 2250.0),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb", 312.0),
    ("NVIDIA A100 80GB PCIe", "a100-80gb-pcie", 312.0),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb", 312.0),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb-pcie", 312.0),
    ("NVIDIA L40S", "l40s", 362.05),
    ("NVIDIA L40", "l40", 181.05),
    ("NVIDIA L4", "l4", 121.0),
    ("NVIDIA A10", "a10", 125.0),
    ("NVIDIA A10G", "a10g", None),  # no NVIDIA datasheet: unknown, not A10's number
    ("NVIDIA GeForce RTX 4090", "rtx-4090", 165.2),
    ("NVIDIA GeForce RTX 3080", "rtx-3080", None),
    ("Tesla T4", "t4", None),
    ("Tesla V100-SXM2-16GB", "v100-sxm2-16gb", None),
    ("NVIDIA RTX 6000 Ada Generation", "rtx-6000-ada-generation", None),
    ("NVIDIA H800", "h800", None),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "h100-80gb-hbm3-mig-1g-10gb", None),  # a slice: no peak
]


@pytest.mark.parametrize("name, slug, bf16", REAL_NAMES)
def test_slug_and_peak_for_real_gpu_names(name, slug, bf16):
    assert gpu_slug({"gpu_name": name}) == slug
    assert peak_tflops(name, "bf16") == bf16


def test_peak_dtypes_and_unknowns():
    assert peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4
    assert peak_tflops("NVIDIA H100 80GB HBM3", "float16") == 989.4
    assert peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert peak_tflops("NVIDIA H100 80GB HBM3", torch.float32) == 66.9
    assert peak_memory_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert peak_memory_bandwidth_gbps("NVIDIA A100") is None  # memory size unknown from the name
    assert peak_tflops("Some Future GPU", "bf16") is None
    assert peak_tflops(None, "bf16") is None
    with pytest.raises(ValueError, match="choose one of"):
        peak_tflops("NVIDIA H100 80GB HBM3", "fp8")


def test_capture_env_without_gpu_is_complete_and_serialisable():
    env = capture_env()
    json.dumps(env)  # a result row must serialise
    if not torch.cuda.is_available():
        assert env["gpu_count"] == 0 and env["gpu_name"] is None and env["driver_version"] is None
        assert gpu_slug(env) == "cpu"
    assert env["torch_version"] == torch.__version__
    for key in (
        "triton_version",
        "transformers_version",
        "peft_version",
        "bitsandbytes_version",
        "liger_kernel_version",
        "hydra_version",
        "python_version",
        "cpu_count",
        "hostname",
        "timestamp_utc",
        "git_sha",
        "git_dirty",
        "ecc_enabled",
        "mig_enabled",
        "power_limit_w",
    ):
        assert key in env
    assert env["git_sha"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_sha"])
    assert package_version("surely-not-an-installed-distribution") is None


def test_fingerprint_keys_only_the_comparability_fields():
    env = {
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "driver_version": "580.1",
        "cuda_version": "13.0",
        "torch_version": "2.11.0",
        "triton_version": "3.6.0",
        "transformers_version": "5.17.0",
        "timestamp_utc": "a",
        "hostname": "x",
    }
    fp = env_fingerprint(env)
    assert re.fullmatch(r"[0-9a-f]{12}", fp)
    assert env_fingerprint({**env, "timestamp_utc": "b", "hostname": "y"}) == fp
    assert env_fingerprint({**env, "driver_version": "580.2"}) != fp
    assert env_fingerprint({**env, "triton_version": "3.5.0"}) != fp


def test_the_callers_commit_wins_over_a_stale_git(monkeypatch):
    """A tree copied to a GPU machine can hold an old .git: the commit the caller names is the one stamped."""
    from optkit.measure.env import git_state

    monkeypatch.setenv("OPTKIT_GIT_SHA", "f" * 40)
    monkeypatch.setenv("OPTKIT_GIT_DIRTY", "0")
    assert git_state() == {"git_sha": "f" * 40, "git_dirty": False}
    monkeypatch.delenv("OPTKIT_GIT_SHA")
    here = git_state()  # this checkout's own HEAD again
    assert here["git_sha"] != "f" * 40
