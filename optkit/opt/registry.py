"""The optimizations optkit can patch in: one registry entry per optimization (its config switch, its
``optkit list`` line, what it needs, the families it applies to, its apply and undo functions), and
what an opt config enables and what this machine lacks for it.

The entries hold the functions themselves, so an import of this module imports every optimization's
module (each imports its kernels only when applied: listing the registry never loads triton).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from optkit.config.schema import OptConfig
from optkit.families import families_with
from optkit.opt import (
    fused_lora,
    gated_mlp,
    grouped_base_gemm,
    loss,
    moe_sorted_routing,
    packed_metadata_cache,
    peers,
    recompute_skip,
    rms_norm,
    rope,
    tiled_mlp,
    unsloth_peer,
)


@dataclass(frozen=True)
class Optimization:
    name: str  # "rms_norm"
    config_key: str  # dotted path inside OptConfig: "kernels.rms_norm", "fused_lora", "compile", ...
    description: str  # one line, shown by `optkit list`
    requires: tuple  # subset of ("triton", "liger", "unsloth", "cuda", "moe", "packing", "lora")
    families: Optional[tuple]  # families it applies to (None = all)
    apply: Callable[[nn.Module, OptConfig], List[str]]  # changes the model, returns its log lines
    # Undoes ``apply`` for applies that change the model other than through edits.replace_module /
    # override_attr (which unpatch reverts by itself); None: nothing to call.
    unapply: Optional[Callable[[nn.Module], None]] = None
    peer: bool = False  # another project's optimization, measured beside optkit's (never ablated one by one)


_KERNEL = ("triton",)
_ALL = (
    Optimization(
        "rms_norm",
        "kernels.rms_norm",
        "RMSNorm modules (Qwen3 q/k norms too) -> optkit's Triton RMSNorm",
        _KERNEL,
        None,
        rms_norm.apply_rms_norm,
    ),
    Optimization(
        "rope",
        "kernels.rope",
        "rotary embedding in every attention module -> optkit's Triton RoPE",
        _KERNEL,
        None,
        rope.apply_rope,
    ),
    Optimization(
        "swiglu",
        "kernels.swiglu",
        "SiLU-gated MLPs -> optkit's fused SwiGLU",
        _KERNEL,
        families_with(activation="silu"),
        gated_mlp.apply_swiglu,
    ),
    Optimization(
        "geglu",
        "kernels.geglu",
        "GELU-gated MLPs (Gemma) -> optkit's fused GeGLU",
        _KERNEL,
        families_with(activation="gelu"),
        gated_mlp.apply_geglu,
    ),
    Optimization(
        "cross_entropy",
        "kernels.cross_entropy",
        "loss on materialized logits -> optkit's Triton cross-entropy",
        _KERNEL,
        None,
        loss.apply_cross_entropy,
    ),
    Optimization(
        "fused_linear_cross_entropy",
        "kernels.fused_linear_cross_entropy",
        "training loss from hidden states and lm_head, logits never materialized",
        _KERNEL,
        None,
        loss.apply_fused_linear_cross_entropy,
    ),
    Optimization(
        "fused_lora",
        "fused_lora",
        "LoRA MLP / QKV / O projections as fused autograd functions",
        ("lora",),
        None,
        fused_lora.apply_fused_lora,
    ),
    Optimization(  # after fused_lora: it groups the projections that one installs
        "fused_lora_grouped_gemm",
        "fused_lora_grouped_gemm",
        "fused LoRA: the Q/K/V and gate/up base GEMMs run as one GEMM each (QLoRA: one NF4 dequantize launch)",
        ("lora",),
        None,
        grouped_base_gemm.apply_grouped_base_gemm,
        grouped_base_gemm.ungroup_base_gemms,
    ),
    Optimization(  # after fused_lora: it sets up the fused MLPs that one installs
        "recompute_skips_mlp_down",
        "recompute_skips_mlp_down",
        "checkpoint recompute of a layer skips the fused MLP's down_proj GEMMs (its output is discarded)",
        ("lora",),
        families_with(mlp_output_only_in_residual=True),
        recompute_skip.apply_recompute_skip,
        recompute_skip.remove_recompute_skip,
    ),
    Optimization(
        "packed_metadata_cache",
        "packed_metadata_cache",
        "packed-sequence boundary metadata built once per batch, not per layer",
        ("packing",),
        None,
        packed_metadata_cache.apply_packed_metadata_cache,
        packed_metadata_cache.remove_packed_metadata_cache,
    ),
    Optimization(
        "moe_sorted_routing",
        "moe_sorted_routing",
        "MoE routing by one sort + grouped GEMM, not per expert",
        ("moe",),
        None,
        moe_sorted_routing.apply_moe_sorted_routing,
        moe_sorted_routing.remove_moe_sorted_routing,
    ),
    Optimization(  # after the MLP's other optimizations: it wraps the forward they install
        "tiled_mlp",
        "tiled_mlp",
        "long sequences: MLP over token chunks (opt.tiled_mlp_chunk_tokens), recomputed in backward",
        (),
        None,
        tiled_mlp.apply_tiled_mlp,
    ),
    Optimization(
        "liger",
        "liger",
        "peer: Liger-Kernel's own patching (RoPE, RMSNorm, SwiGLU/GeGLU, fused linear CE)",
        ("liger",),
        None,
        peers.apply_liger,
        peer=True,
    ),
    Optimization(  # builds the model itself (bench/setup.py asks it to); apply only names what it did
        "unsloth",
        "unsloth",
        "peer: Unsloth's own path (FastLanguageModel.from_pretrained + get_peft_model), in its own process",
        ("cuda", "unsloth"),
        None,
        unsloth_peer.apply_unsloth,
        peer=True,
    ),
    Optimization(
        "compile",
        "compile",
        "peer: torch.compile per decoder layer or of the whole model (opt.compile_scope, opt.compile_mode)",
        (),
        None,
        peers.apply_compile,
        peer=True,
    ),
)
REGISTRY: Dict[str, Optimization] = {o.name: o for o in _ALL}  # insertion order = application order
PEERS = tuple(name for name, o in REGISTRY.items() if o.peer)
# Conditions on the model, not the machine: an optimization whose condition fails is skipped with a
# log line. ("packing" cannot be seen on the model: that apply function decides for itself.)
_MODEL_CONDITIONS = ("moe", "lora", "packing")


class MissingRequirement(RuntimeError):
    """An enabled optimization needs something this machine lacks; the runner records a skipped row."""


# ---- config ------------------------------------------------------------------------------------


def load_opt_config(opt_cfg: Any) -> OptConfig:
    """An OptConfig from a preset name (conf/opt/<name>.yaml), an OptConfig, a DictConfig or a dict."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(opt_cfg, OptConfig):
        return opt_cfg
    if isinstance(opt_cfg, str):  # presets extend each other (Hydra defaults lists): compose, don't just load
        from optkit.config.compose import compose_preset

        opt_cfg = compose_preset("opt", opt_cfg)
    if not isinstance(opt_cfg, (dict, DictConfig)):
        raise TypeError(f"opt_cfg must be a preset name, OptConfig, DictConfig or dict, not {type(opt_cfg).__name__}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptConfig), opt_cfg))
    except OmegaConfBaseException as exc:
        raise ValueError(f"bad opt config: {exc}") from exc


def switch_value(cfg: OptConfig, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def enabled_names(opt_cfg: Any) -> List[str]:
    """Registry names switched on in ``opt_cfg``, in application order."""
    cfg = load_opt_config(opt_cfg)
    return [name for name, opt in REGISTRY.items() if switch_value(cfg, opt.config_key)]


def _machine_problem(requirement: str, device: Optional[torch.device]) -> Optional[str]:
    if requirement == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if requirement == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if device is not None and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return f"optkit's Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU); device is {device}"
    if requirement == "bitsandbytes" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    if requirement == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if requirement == "unsloth" and importlib.util.find_spec("unsloth") is None:
        return f"unsloth is not installed ({unsloth_peer.INSTALL})"
    return None


def missing_requirements(opt_cfg: Any, model: Optional[nn.Module] = None, device=None) -> List[str]:
    """What this machine lacks for the enabled optimizations, one message per problem ([] when nothing)."""
    if device is None and model is not None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    device = torch.device(device) if device is not None else None
    names_by_problem: Dict[str, List[str]] = {}  # one message per problem, naming every optimization it stops
    for name in enabled_names(opt_cfg):
        for requirement in REGISTRY[name].requires:
            problem = None if requirement in _MODEL_CONDITIONS else _machine_problem(requirement, device)
            if problem:
                names_by_problem.setdefault(problem, []).append(name)
    return [f"{', '.join(names)}: {problem}" for problem, names in names_by_problem.items()]
