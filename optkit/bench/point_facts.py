"""Facts of a point's process that say which computation was measured, beside its timings: the allocator
config it ran under, the precision of its LoRA adapters, and which attention kernels a step ran.

The attention backend is read, not guessed: one extra untimed step (after the timed windows, where nothing
is measured any more) runs under torch's profiler with host-side activity only, and the attention ops it
records name the backend. That covers peers that pick their own (Unsloth: flash-attn, then xformers, then
SDPA) and compiled code (inductor calls SDPA's kernels as ops).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, List

import torch
from torch import nn

# (substring of a lower-cased profiled op name, backend); the first match of an op wins, so the CPU flash op
# comes before the GPU one it contains.
ATTENTION_OPS = (
    ("_scaled_dot_product_flash_attention_for_cpu", "sdpa_flash_cpu"),
    ("_scaled_dot_product_flash_attention", "sdpa_flash"),
    ("_scaled_dot_product_efficient_attention", "sdpa_efficient"),
    ("_scaled_dot_product_cudnn_attention", "sdpa_cudnn"),
    ("_scaled_dot_product_attention_math", "sdpa_math"),
    ("flash_attn", "flash_attn"),
    ("flashattn", "flash_attn"),
    ("xformers", "xformers"),
    ("flex_attention", "flex"),
)
UNFUSED = "unfused"


def process_facts(model: nn.Module) -> Dict[str, Any]:
    """alloc_conf and lora_adapter_dtype of a built model's process."""
    return {
        "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "lora_adapter_dtype": adapter_dtype(model),
    }


def adapter_dtype(model: nn.Module) -> Any:
    """The dtype of the trainable LoRA weights ('+'-joined if they differ), None without adapters."""
    dtypes = sorted({str(p.dtype).replace("torch.", "") for n, p in model.named_parameters() if "lora_" in n})
    return "+".join(dtypes) if dtypes else None


def backends_of(op_names: Iterable[str]) -> List[str]:
    """The attention backends named by profiled op names, in ATTENTION_OPS order."""
    seen = set()
    for name in op_names:
        lower = name.lower()
        backend = next((b for pattern, b in ATTENTION_OPS if pattern in lower), None)
        if backend:
            seen.add(backend)
    order = list(dict.fromkeys(b for _, b in ATTENTION_OPS))
    return [b for b in order if b in seen]


def attention_backend(step: Callable[[], Any]) -> Dict[str, Any]:
    """{"attention_backend": ...} from the ops one call of ``step`` (a training step) records; a failure is
    named there instead (the timed windows are already measured)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - an extra step; an OOM here must not lose the windows
        return {"attention_backend": f"unknown ({type(exc).__name__})"}
    found = backends_of(event.name for event in prof.events())
    return {"attention_backend": "+".join(found) if found else UNFUSED}
