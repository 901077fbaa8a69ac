"""Optimizers by name (train.optimizer): adamw | adamw_fused (torch) | adamw_8bit | paged_adamw_8bit (bitsandbytes)
| adamw_8bit_fused (optkit).

- ``adamw``: torch AdamW with the multi-tensor (foreach) implementation, torch's default on GPU.
- ``adamw_fused``: torch AdamW with ``fused=True`` (one kernel per parameter group and dtype).
- ``adamw_8bit``: bitsandbytes AdamW8bit, blockwise 8-bit moments (tensors under 4096 elements keep
  32-bit state: bitsandbytes' ``min_8bit_size``).
- ``paged_adamw_8bit``: as adamw_8bit with the state in CUDA unified (managed) memory that pages to host
  under pressure. The torch allocator never sees that memory: read its cost from NVML, not from
  ``torch.cuda.max_memory_allocated``. On CPU bitsandbytes falls back to non-paged state.
- ``adamw_8bit_fused``: optkit's blockwise 8-bit AdamW (optkit/kernels/adamw_8bit.py): the same kind of
  state as adamw_8bit (8-bit m and v, one fp32 absmax per 256 elements; small tensors 8-bit too), updated
  for every parameter by one Triton launch per dtype instead of one kernel and host round per tensor.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from optkit.kernels.adamw_8bit import FusedAdamW8bit


def _torch_adamw(fused: bool) -> Callable:
    def build(params, **kwargs):
        if fused:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        return torch.optim.AdamW(params, foreach=True, **kwargs)

    return build


def _bnb(name: str) -> Callable:
    def build(params, **kwargs):
        try:
            import bitsandbytes as bnb
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"train.optimizer={name} needs bitsandbytes: pip install 'optkit[quant]' (bitsandbytes>=0.45)"
            ) from exc
        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, **kwargs)

    return build


BUILDERS: Dict[str, Callable] = {
    "adamw": _torch_adamw(fused=False),
    "adamw_fused": _torch_adamw(fused=True),
    "adamw_8bit": _bnb("adamw_8bit"),
    "paged_adamw_8bit": _bnb("paged_adamw_8bit"),
    "adamw_8bit_fused": FusedAdamW8bit,
}


OPTIMIZERS = tuple(BUILDERS)  # train.optimizer


def build_optimizer(params, train_cfg) -> torch.optim.Optimizer:
    """The optimizer ``train_cfg.optimizer`` over the parameters of ``params`` that require grad."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check train.method and train.lora_targets")
    name = train_cfg.optimizer
    if name not in BUILDERS:
        raise ValueError(f"train.optimizer={name!r} is not valid; choose one of: {', '.join(BUILDERS)}")
    return BUILDERS[name](params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
