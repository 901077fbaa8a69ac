"""opt.recompute_skips_mlp_down: a decoder layer's checkpoint recompute skips its MLP's down projection.

Why nothing is lost: under gradient checkpointing every decoder layer runs again in backward to rebuild
what its backward saved, and that rerun's output is discarded. Where the layer adds its MLP's output
straight to the residual and reads it nowhere else (families with ``mlp_output_only_in_residual`` in
optkit/families.py), no one in the rerun reads that output: the add saves nothing, and the fused MLP's
backward needs only x, gate, up, x A^T of gate/up and h A^T of down. So in the rerun the fused MLP
(opt.fused_lora) computes h A^T and skips down_proj's base GEMM (QLoRA: its NF4 dequantize too) and its
LoRA B GEMM, returning uninitialized memory of the output's shape. On Llama-3-8B that is ~27% of the
recompute's GEMM FLOPs, ~6% of a checkpointed step's.

When it skips, all of: the MLP is fused; its decoder layer is exactly its family's HF decoder-layer class
(a subclass may read the output); the call is a marked layer recompute (optkit/train/recompute.py); grad
is enabled (a no-grad forward saves nothing, so its output is the point); the MLP has no forward hook (a
hook reads the output); and the call is not traced by torch.compile. Recomputes are marked by
train.checkpointing=offload / offload_double_buffer always, and by HF's checkpointing
(train.checkpointing=standard, Trainer's gradient_checkpointing=True) when it is non-reentrant: a forward
pre-hook on each such layer adds the mark to HF's checkpoint function when the layer runs checkpointed.
A reentrant one, or one with its own context_fn, is left alone and the MLP runs whole (said once).

Under opt.compile it is not installed: compiled MLPs never skip (the mark is read at run time, a graph
would bake it in), and a checkpoint traced whole into a graph (compile_scope=model) accepts only
TorchDispatchMode contexts, which the mark is not.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import nn

from optkit.config.schema import OptConfig
from optkit.families import decoder_layer_class, get_family
from optkit.opt.edits import add_forward_pre_hook, family_of_patched, note_once, state_of
from optkit.opt.fused_lora import FusedMLPForward, _ranges
from optkit.train.method import decoder_layers
from optkit.train.recompute import checkpoint_contexts, in_layer_recompute, with_recompute_mark

NAME = "recompute_skips_mlp_down"


class OutputUnread:
    """FusedMLPForward.skip_down_when of the MLP of an allowlisted decoder layer (an object, not a closure:
    a deep copy of the model then asks about its own MLP's hooks)."""

    def __init__(self, mlp: nn.Module):
        self.mlp = mlp

    def __call__(self) -> bool:
        hooked = self.mlp._forward_hooks or nn.modules.module._global_forward_hooks
        return in_layer_recompute() and torch.is_grad_enabled() and not hooked


def _marking_hf_recomputes(note: Callable[[str], None]):
    """A forward pre-hook that gives HF's checkpoint function of a layer the recompute mark."""

    def hook(layer: nn.Module, args, kwargs):
        if torch.compiler.is_compiling() or not (
            getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled()
        ):
            return None
        func = getattr(layer, "_gradient_checkpointing_func", None)
        marked = with_recompute_mark(func)
        if isinstance(marked, str):
            note(f"{marked}: its recomputes run the MLP whole")
        elif marked is not func:
            layer._gradient_checkpointing_func = marked
        return None

    return hook


def apply_recompute_skip(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    """Let the fused MLP of every allowlisted decoder layer skip down_proj in recomputes; returns the log."""
    if opt_cfg.compile:
        return ["skipped (opt.compile: compiled MLPs compute their output in full; see optkit/opt/recompute_skip.py)"]
    family = family_of_patched(model)
    if not get_family(family).mlp_output_only_in_residual:
        return [f"skipped ({family}'s decoder layer reads its MLP output beyond the residual add: optkit/families.py)"]
    allowed = decoder_layer_class(family)
    hook = _marking_hf_recomputes(note_once(model, NAME))
    skipping: List[int] = []
    left: Dict[str, List[int]] = {}
    for index, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        forward = mlp.__dict__.get("forward") if mlp is not None else None
        if not isinstance(forward, FusedMLPForward):
            left.setdefault("the MLP is not fused (opt.fused_lora)", []).append(index)
        elif type(layer) is not allowed:
            left.setdefault(f"{type(layer).__name__} is not {allowed.__name__}", []).append(index)
        else:
            forward.skip_down_when = OutputUnread(mlp)
            if state_of(model) is not None:
                add_forward_pre_hook(model, layer, hook)
            else:
                layer.register_forward_pre_hook(hook, with_kwargs=True)
            skipping.append(index)
    if not skipping:
        return [f"skipped ({why}: layers {_ranges(indices)})" for why, indices in left.items()]
    log = [
        f"down_proj skipped in checkpoint recomputes of layers {_ranges(skipping)} ({allowed.__name__} only adds the "
        "MLP output to the residual); recomputes are marked under train.checkpointing=offload* and non-reentrant "
        "HF checkpointing"
    ]
    return log + [f"not in layers {_ranges(indices)}: {why}" for why, indices in left.items()]


def remove_recompute_skip(model: nn.Module) -> None:
    """Undo what apply did besides the recorded hooks: the MLPs ask nothing, HF's checkpoint functions lose
    the mark (their other arguments kept)."""
    for layer in decoder_layers(model):
        forward = getattr(layer, "mlp", nn.Module()).__dict__.get("forward")
        if isinstance(forward, FusedMLPForward):
            forward.skip_down_when = None
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(func, "keywords", {}).get("context_fn") is checkpoint_contexts:
            kwargs = {k: v for k, v in func.keywords.items() if k != "context_fn"}
            layer._gradient_checkpointing_func = type(func)(func.func, **kwargs)


def skipped_params_per_token(model: nn.Module) -> int:
    """Matmul parameters per token that checkpoint recomputes leave out (for hardware FLOPs): each fused MLP that
    skips its down projection there skips the base weight and the LoRA B."""
    skipped = 0
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, FusedMLPForward) and forward.skip_down_when is not None:
            (down,) = forward.group.down
            skipped += down.base.out_features * (down.base.in_features + down.rank)
    return skipped
