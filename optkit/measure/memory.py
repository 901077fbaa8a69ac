"""Allocator and host memory figures (the other two sources beside NVML, see nvml.py).

The allocator's peaks catch spikes shorter than NVML's polling interval but miss everything the
caching allocator does not own (CUDA context, cuBLAS workspaces, CUDA managed memory such as
bitsandbytes' paged optimizers). Host RSS matters for CPU offloading of activations.
"""

from __future__ import annotations

import sys
from typing import Optional, Union

import torch

DeviceLike = Union[torch.device, str, int]

ALLOCATOR_FIELDS = (
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "peak_active_bytes",
    "current_allocated_bytes",
    "current_reserved_bytes",
    "num_alloc_retries",
    "num_ooms",
)
# torch.cuda.memory_stats key for each field
_STAT_KEYS = {
    "peak_allocated_bytes": "allocated_bytes.all.peak",
    "peak_reserved_bytes": "reserved_bytes.all.peak",
    "peak_active_bytes": "active_bytes.all.peak",
    "current_allocated_bytes": "allocated_bytes.all.current",
    "current_reserved_bytes": "reserved_bytes.all.current",
    "num_alloc_retries": "num_alloc_retries",
    "num_ooms": "num_ooms",
}


def _is_cuda(device: DeviceLike) -> bool:
    if isinstance(device, int):
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def reset_allocator_peaks(device: DeviceLike) -> None:
    """Start a new peak window (no-op on CPU). Call after warm-up, before the measured steps."""
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def allocator_peaks(device: DeviceLike) -> dict:
    """``ALLOCATOR_FIELDS`` from torch.cuda.memory_stats since the last reset; all None on CPU."""
    if not _is_cuda(device):
        return dict.fromkeys(ALLOCATOR_FIELDS)
    stats = torch.cuda.memory_stats(device)
    return {field: stats.get(key) for field, key in _STAT_KEYS.items()}


def peak_rss_bytes() -> Optional[int]:
    """Peak resident set size of this process over its whole life (not resettable)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(max_rss) if sys.platform == "darwin" else int(max_rss) * 1024


def current_rss_bytes() -> Optional[int]:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)
