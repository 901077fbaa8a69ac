"""Capture the environment a result was measured in, and key results by it.

A result row carries ``capture_env()``; ``gpu_slug`` names the results directory of a GPU kind
and ``env_fingerprint`` says whether two rows were measured on a comparable stack (GPU, driver,
CUDA, torch, triton, transformers): regressions are only judged between equal fingerprints.

Nothing here raises on a machine without a GPU, NVML, git or any optional library: the field is
None. GPU facts come from NVML first, so that capturing the environment in a parent process does
not initialise CUDA there; torch.cuda is the fallback when NVML is unavailable.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

from optkit.measure import gpu_specs, nvml

# importable name -> distribution names to try (nightly torch ships triton as pytorch-triton)
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "triton": ("triton", "pytorch-triton"),
    "transformers": ("transformers",),
    "peft": ("peft",),
    "bitsandbytes": ("bitsandbytes",),
    "liger_kernel": ("liger-kernel", "liger_kernel"),
    "unsloth": ("unsloth",),
    "accelerate": ("accelerate",),
    "trl": ("trl",),
    "hydra": ("hydra-core",),
    "nvidia_ml_py": ("nvidia-ml-py",),
}
# Variables that change what is measured; recorded verbatim when set.
_ENV_VARS = (
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "PYTORCH_CUDA_ALLOC_CONF",
    "PYTORCH_ALLOC_CONF",
    "CUBLAS_WORKSPACE_CONFIG",
    "NVIDIA_TF32_OVERRIDE",
    "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_INTERPRET",
    "OMP_NUM_THREADS",
)
FINGERPRINT_FIELDS = (
    "gpu_name",
    "driver_version",
    "cuda_version",
    "torch_version",
    "triton_version",
    "transformers_version",
)


def package_version(name: str) -> Optional[str]:
    """Installed version of an entry of ``_DISTRIBUTIONS`` (or a distribution name); never imports it."""
    for dist in _DISTRIBUTIONS.get(name, (name,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    """SHA of HEAD and whether tracked files differ from it (untracked files don't count).

    OPTKIT_GIT_SHA (and OPTKIT_GIT_DIRTY), when set, win: a copy of the tree shipped to a GPU machine may
    carry no .git, or a stale one whose HEAD is not the commit the copy holds; the caller knows which it is.
    """
    if os.environ.get("OPTKIT_GIT_SHA"):
        dirty = os.environ.get("OPTKIT_GIT_DIRTY")
        return {
            "git_sha": os.environ["OPTKIT_GIT_SHA"],
            "git_dirty": None if dirty is None else dirty.lower() in ("1", "true", "yes"),
        }
    sha = _git("rev-parse", "HEAD")
    if sha is None:
        return {"git_sha": None, "git_dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status)}


def _cuda_version_str(version_int: Optional[int]) -> Optional[str]:
    """NVML's CUDA driver version 12040 -> "12.4"."""
    return None if version_int is None else f"{version_int // 1000}.{version_int % 1000 // 10}"


def _nvml_gpu_facts(pynvml, handle) -> dict:
    ask = nvml.try_call
    ecc = ask(pynvml.nvmlDeviceGetEccMode, handle)
    mig = ask(pynvml.nvmlDeviceGetMigMode, handle)
    cc = ask(pynvml.nvmlDeviceGetCudaComputeCapability, handle)
    power_mw = ask(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle)
    memory = ask(nvml.read_memory, pynvml, handle)
    driver = ask(pynvml.nvmlSystemGetDriverVersion)
    return {
        "gpu_name": nvml.as_str(pynvml.nvmlDeviceGetName(handle)),
        "gpu_total_memory_bytes": None if memory is None else memory[2],
        "compute_capability": None if cc is None else f"{cc[0]}.{cc[1]}",
        "driver_version": None if driver is None else nvml.as_str(driver),
        "cuda_driver_version": _cuda_version_str(ask(pynvml.nvmlSystemGetCudaDriverVersion)),
        "sm_clock_max_mhz": ask(pynvml.nvmlDeviceGetMaxClockInfo, handle, 1),
        "sm_clock_mhz": ask(pynvml.nvmlDeviceGetClockInfo, handle, 1),
        "mem_clock_max_mhz": ask(pynvml.nvmlDeviceGetMaxClockInfo, handle, 2),
        "power_limit_w": None if power_mw is None else power_mw / 1000.0,
        "ecc_enabled": None if ecc is None else bool(ecc[0]),
        "mig_enabled": None if mig is None else bool(mig[0]),
    }


def _torch_gpu_facts(device_index: int) -> dict:
    """GPU facts from torch.cuda (initialises CUDA in this process, hence only a fallback)."""
    import torch

    props = torch.cuda.get_device_properties(device_index)
    return {
        "gpu_name": props.name,
        "gpu_total_memory_bytes": int(props.total_memory),
        "compute_capability": f"{props.major}.{props.minor}",
    }


_GPU_FIELDS = (
    "gpu_name",
    "gpu_total_memory_bytes",
    "compute_capability",
    "driver_version",
    "cuda_driver_version",
    "sm_clock_max_mhz",
    "sm_clock_mhz",
    "mem_clock_max_mhz",
    "power_limit_w",
    "ecc_enabled",
    "mig_enabled",
)


def gpu_facts(device_index: int = 0) -> dict:
    """Every ``_GPU_FIELDS`` entry plus gpu_count; None where unknown, gpu_count 0 without CUDA."""
    facts = dict.fromkeys(_GPU_FIELDS)
    try:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        cuda_count = 0
    from_nvml = nvml.query_once(device_index, _nvml_gpu_facts) if cuda_count else None
    if from_nvml is not None:
        facts.update(from_nvml)
    elif cuda_count:
        facts.update(_torch_gpu_facts(device_index))
    facts["gpu_count"] = cuda_count
    return facts


def capture_env(device_index: int = 0) -> dict:
    """A flat, JSON-serialisable description of this machine and software stack."""
    try:
        import torch

        cuda_version = torch.version.cuda
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        cuda_version, cudnn = None, None
    env = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "python_version": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cuda_version": cuda_version,  # the CUDA torch was built with
        "cudnn_version": cudnn,
    }
    env.update(gpu_facts(device_index))
    for name in _DISTRIBUTIONS:
        env[f"{name}_version"] = package_version(name)
    env.update(git_state())
    env["env_vars"] = {k: os.environ[k] for k in _ENV_VARS if k in os.environ}
    return env


def slugify(text: str) -> str:
    return "-".join(gpu_specs.name_tokens(text)).replace(".", "-")


def gpu_slug(env: dict) -> str:
    """Stable lower-case id of the GPU kind: "NVIDIA H100 80GB HBM3" -> "h100"; no GPU -> "cpu".

    Known GPUs get the table's slug; others their name without vendor / brand words
    ("NVIDIA GeForce RTX 3080" -> "rtx-3080", "Tesla T4" -> "t4").
    """
    name = env.get("gpu_name")
    if not name:
        return "cpu"
    spec = gpu_specs.lookup(name)
    if spec is not None:
        return spec.slug
    words = [t for t in gpu_specs.name_tokens(name) if t not in ("nvidia", "geforce", "tesla", "quadro")]
    return slugify(" ".join(words)) or "unknown-gpu"


def env_fingerprint(env: dict) -> str:
    """12 hex chars over the fields that make two results comparable (``FINGERPRINT_FIELDS``)."""
    key = json.dumps({f: env.get(f) for f in FINGERPRINT_FIELDS}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]
