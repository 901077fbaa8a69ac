"""opt.kernels.rms_norm: every RMSNorm module of the model (Qwen3's q/k norms too) -> optkit's Triton RMSNorm.

The swap shares the HF module's weight Parameter, so state-dict keys and optimizer state carry over; the
family's norm rounding (families.py) picks the kernel's cast mode.
"""

from __future__ import annotations

from typing import List

from torch import nn

from optkit.config.schema import OptConfig
from optkit.families import get_family
from optkit.opt.edits import family_of_patched, modules_of_class, replace_module


def apply_rms_norm(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    from optkit.kernels.rms_norm import RMSNorm

    family = get_family(family_of_patched(model))
    class_name = f"{family.class_prefix}RMSNorm"
    cast_mode = family.norm_rounding
    found = modules_of_class(model, class_name)
    for path, norm in found:
        replace_module(model, path, RMSNorm.from_module(norm, cast_mode=cast_mode), by="rms_norm")
    return [f"rms_norm: {len(found)} x {class_name} -> optkit RMSNorm (cast_mode={cast_mode})"]
