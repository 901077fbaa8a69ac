"""Count device-to-host synchronisations, a metric of its own: several optimisations claim to
remove syncs (``.item()``, ``.tolist()``, ``nonzero``, boolean-mask indexing, host copies of device
tensors), and the count is the proof.

Runs ``fn`` under ``torch.cuda.set_sync_debug_mode("warn")``; torch then warns once per
synchronising call ("called a synchronizing CUDA operation") and the warnings are counted.
Warnings raised inside backward are replayed by autograd on the calling thread, so they count.
Not seen (torch's own limits): ``torch.cuda.synchronize()``, ``Event.synchronize()``,
torch.distributed and torch.sparse, and syncs made by extensions calling CUDA directly. Run it on
an untimed step: the debug mode has its own cost.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

SYNC_WARNING_TEXT = "called a synchronizing CUDA operation"


def count_device_syncs(fn: Callable[[], object]) -> Optional[int]:
    """Number of synchronising CUDA calls made by ``fn()``; None without CUDA (fn not run)."""
    if not torch.cuda.is_available():
        return None
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count every sync, not the first one per call site
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if SYNC_WARNING_TEXT in str(w.message)]
    for w in caught:  # hand every other warning back to the caller's filters
        if SYNC_WARNING_TEXT not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return len(syncs)
