"""opt.kernels.swiglu / opt.kernels.geglu: the family's gated MLP modules -> optkit's fused SwiGLU / GeGLU MLP.

The new module keeps the HF module's own projections (LoRA wrappers included) and fuses only the activation
and the product; MLPs with another activation are left alone and logged.
"""

from __future__ import annotations

from typing import Callable, List

from torch import nn

from optkit.config.schema import OptConfig
from optkit.families import get_family
from optkit.opt.edits import family_of_patched, hf_model_of, is_moe, modules_of_class, replace_module


def _swap_gated_mlps(model: nn.Module, by: str, accepts: Callable[[str], bool], make: Callable) -> List[str]:
    from optkit.kernels._launch import hf_activation_name

    class_name = f"{get_family(family_of_patched(model)).class_prefix}MLP"
    swapped, other = 0, []
    for path, mlp in modules_of_class(model, class_name):
        activation = hf_activation_name(mlp)
        if not accepts(activation):
            other.append(f"{path} ({activation})")
            continue
        replace_module(model, path, make(mlp), by=by)
        swapped += 1
    log = [f"{by}: {swapped} x {class_name} -> optkit {by} MLP"]
    if other:
        log.append(f"{by}: left {len(other)} MLPs with another activation: {', '.join(other)}")
    if swapped == 0 and is_moe(hf_model_of(model)):
        log.append(f"{by}: the MoE experts keep HF's activation (3-D expert weights; see moe_sorted_routing)")
    return log


def apply_swiglu(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    from optkit.kernels.swiglu import SILU_ACTIVATIONS, SwiGLUMLP

    return _swap_gated_mlps(model, "swiglu", lambda act: act in SILU_ACTIVATIONS, SwiGLUMLP.from_module)


def apply_geglu(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    from optkit.kernels.geglu import HF_GELU_FORMS, GeGLUMLP

    return _swap_gated_mlps(model, "geglu", lambda act: act in HF_GELU_FORMS, GeGLUMLP.from_module)
