"""Fused LoRA (opt.fused_lora): one autograd Function per attention input (Q, K, V together), per O
projection and per gated MLP, computing ``y = x W^T + b + s (x A^T) B^T`` for every projection.

Why it is faster and leaner than peft's per-module path (same parameters, same math):
- peft runs, per projection, the base linear, a clone, a dtype cast of x to the adapter dtype, two
  LoRA GEMMs, a scale multiply and an add, each an autograd node that saves its inputs; here x is read
  once for Q, K and V, the three A projections are one GEMM (A stacked to (3r, in)), the scale is
  folded into the GEMM epilogue, and dx is one accumulation.
- what backward needs is saved and nothing else: x and x A^T (N x r) per input, plus gate and up for
  the MLP. The MLP's activation output h is recomputed in backward instead of saved, and the base
  weight is never kept: for QLoRA it is dequantized once per use (optkit's one-kernel NF4 dequantize)
  in forward and again in backward, so no (out x in) tensor lives between the two.
- gradients flow to x, A and B only (the base weight and bias are frozen; a trainable base weight
  means the projection is left to peft).

LoRA math is done in the activation dtype (bf16 on GPU); peft upcasts x to its float32 adapters, so
results differ by bf16 rounding (tests bound it). Parameter gradients are returned in the adapters' dtype.

The projection math (frozen base + adapter, the per-step adapter cast cache, GEMM layout) lives in
optkit.opt.lora_projection; this module holds the autograd Functions and installs them.

How it is applied: per decoder layer, an instance-level ``forward`` is installed on the MLP module and
on q/k/v/o_proj (the class and the parameters are untouched, so the state dict is unchanged);
``remove_fused_lora`` deletes them. Q, K and V share one Function: whichever of the three is called
first computes all three for that input, the others take their output (HF's attention code, including
Qwen3's q_norm/k_norm applied after the projections, runs unchanged). The fast path needs one active
adapter with lora_dropout == 0, no DoRA/variants and no merged weights; anything else stays peft's and
is named in the log.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optkit.opt.edits import override_attr, state_of
from optkit.opt.lora_projection import (
    LoRAOperandCache,
    LoRAProjection,
    autocast_dtype,
    autocast_off,
    lora_parameters,
    project,
    project_backward,
    projection_of,
)
from optkit.train.method import decoder_layers

logger = logging.getLogger("optkit")
QKV_NAMES = ("q_proj", "k_proj", "v_proj")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


class ProjectionGroup:
    """Projections that read the same input (Q, K, V; or O alone), with their output names."""

    def __init__(self, names: Sequence[str], projections: Sequence[LoRAProjection]):
        self.names = tuple(names)
        self.projections = tuple(projections)
        self.operands = LoRAOperandCache(self.projections)


class _FusedProjectionsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProjectionGroup, cache: bool, *lora_params: Tensor):
        ctx.x_dtype = x.dtype
        dtype = autocast_dtype(x)  # asked before autocast_off: inside it autocast reads as off
        with autocast_off(x.device.type):
            x = x.to(dtype)
            x2d = x.reshape(-1, x.shape[-1])
            outputs, xa = project(x2d, group.projections, group.operands.get(x.dtype, cache))
        ctx.group = group
        ctx.save_for_backward(x, xa)
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x, xa = ctx.saved_tensors
        x2d = x.reshape(-1, x.shape[-1])
        group = ctx.group
        with autocast_off(x.device.type):
            dys = [g.reshape(-1, g.shape[-1]).to(x.dtype) for g in grads]
            dx, d_lora = project_backward(
                x2d, xa, dys, group.projections, group.operands.get(x.dtype), ctx.needs_input_grad[0]
            )
        group.operands.drop()
        return (dx.view_as(x).to(ctx.x_dtype) if dx is not None else None, None, None, *d_lora)


# ----------------------------------------------------------------------------- gated MLP
@dataclass(frozen=True)
class GatedActivation:
    """``h = act(gate) * up`` and its backward ``(dh, gate, up) -> (d_gate, d_up)`` as plain calls (no
    autograd inside the fused backward, so torch.compile can trace it)."""

    forward: Callable[[Tensor, Tensor], Tensor]
    backward: Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor]]
    label: str


def _torch_gated(fn: Callable[[Tensor, Tensor], Tensor], label: str) -> GatedActivation:
    def backward(dh: Tensor, gate: Tensor, up: Tensor) -> Tuple[Tensor, Tensor]:
        return torch.func.vjp(fn, gate, up)[1](dh)

    return GatedActivation(fn, backward, label)


def _kernel_or_torch(op: str, extra: tuple, torch_fn: Callable[[Tensor, Tensor], Tensor], math: str):
    try:
        kernel = importlib.import_module(f"optkit.kernels.{op}")  # registers torch.ops.optkit.<op>_fwd / _bwd
    except ImportError:
        return _torch_gated(torch_fn, f"torch {math} (optkit.kernels.{op} missing)")
    # Eager calls go straight to the launchers: a custom op's dispatch costs host time on every call
    # (~150 us vs ~12 us for an autograd.Function, measured on CPU); compiled graphs need the opaque op.
    op_fwd, op_bwd = getattr(torch.ops.optkit, f"{op}_fwd"), getattr(torch.ops.optkit, f"{op}_bwd")
    raw_fwd, raw_bwd = getattr(kernel, f"_{op}_fwd"), getattr(kernel, f"_{op}_bwd")

    def fwd(g: Tensor, u: Tensor) -> Tensor:
        return (op_fwd if torch.compiler.is_compiling() else raw_fwd)(g, u, *extra)

    def bwd(dh: Tensor, g: Tensor, u: Tensor) -> Tuple[Tensor, Tensor]:
        return (op_bwd if torch.compiler.is_compiling() else raw_bwd)(dh, g, u, *extra)

    return GatedActivation(fwd, bwd, f"optkit {op} kernel: {math}")


def gated_activation(name: Optional[str]) -> Union[GatedActivation, str]:
    """The gated activation for an HF activation name, preferring optkit's kernels; a reason if unknown."""
    if name in ("silu", "swish"):
        return _kernel_or_torch("swiglu", (), lambda g, u: F.silu(g) * u, "silu(gate) * up")
    if name in ("gelu_pytorch_tanh", "gelu"):
        approximate = "tanh" if name == "gelu_pytorch_tanh" else "none"
        return _kernel_or_torch(
            "geglu",
            (approximate,),
            lambda g, u: F.gelu(g, approximate=approximate) * u,
            f"gelu(gate, {approximate}) * up",
        )
    return f"activation {name!r} is not gated SiLU/GELU"


class MLPGroup:
    def __init__(self, gate: LoRAProjection, up: LoRAProjection, down: LoRAProjection, act: GatedActivation):
        self.gate_up = (gate, up)
        self.down = (down,)
        self.act = act
        self.gate_up_operands = LoRAOperandCache(self.gate_up)
        self.down_operands = LoRAOperandCache(self.down)

    def lora_parameters(self) -> List[Tensor]:
        return lora_parameters(self.gate_up) + lora_parameters(self.down)


class _FusedMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: MLPGroup, cache: bool, skip_down: bool, *lora_params: Tensor):
        ctx.x_dtype = x.dtype
        dtype = autocast_dtype(x)  # asked before autocast_off: inside it autocast reads as off
        with autocast_off(x.device.type):
            x = x.to(dtype)
            x2d = x.reshape(-1, x.shape[-1])
            (gate, up), xa_gate_up = project(x2d, group.gate_up, group.gate_up_operands.get(x.dtype, cache))
            h = group.act.forward(gate, up)  # (N, I), not saved: recomputed in backward from gate and up
            if skip_down:  # nobody reads y (FusedMLPForward.skip_down_when): only h A^T, which down's dB needs
                operands = group.down_operands.get(h.dtype, cache)
                xa_down = h @ operands.A.t() if operands.A is not None else None
                y = h.new_empty(h.shape[0], group.down[0].base.out_features)
            else:
                (y,), xa_down = project(h, group.down, group.down_operands.get(h.dtype, cache))
        ctx.group = group
        ctx.save_for_backward(x, gate, up, xa_gate_up, xa_down)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, gate, up, xa_gate_up, xa_down = ctx.saved_tensors
        group = ctx.group
        with autocast_off(x.device.type):
            h = group.act.forward(gate, up)
            dy = dy.reshape(-1, dy.shape[-1]).to(h.dtype)
            dh, d_down = project_backward(h, xa_down, [dy], group.down, group.down_operands.get(h.dtype), True)
            del h
            d_gate, d_up = group.act.backward(dh, gate, up)
            del dh
            x2d = x.reshape(-1, x.shape[-1])
            dx, d_gate_up = project_backward(
                x2d,
                xa_gate_up,
                [d_gate, d_up],
                group.gate_up,
                group.gate_up_operands.get(d_gate.dtype),
                ctx.needs_input_grad[0],
            )
        group.down_operands.drop()
        group.gate_up_operands.drop()
        return (dx.view_as(x).to(ctx.x_dtype) if dx is not None else None, None, None, None, *d_gate_up, *d_down)


# ----------------------------------------------------------------------------- installing
class _FusedForward:
    """An instance-level ``forward`` installed by apply_fused_lora (recognized and removed by type)."""


def _records_graph() -> bool:
    """Whether this forward records a graph (a backward will follow and drop the cached adapter casts);
    asked here because inside an autograd.Function's forward grad mode is always off."""
    return torch.is_grad_enabled()


class FusedProjectionForward(_FusedForward):
    """forward of q/k/v/o_proj: the group's Function computes every output of the group for one input."""

    def __init__(self, module: nn.Module, name: str, shared: "_SharedOutputs"):
        self.module, self.name, self.shared = module, name, shared

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs:  # peft options such as adapter_names: leave them to peft
            return type(self.module).forward(self.module, x, *args, **kwargs)
        return self.shared.output(self.name, x)


class _SharedOutputs:
    """Hands each projection its output; recomputes the group when the input or the call pattern changes."""

    def __init__(self, group: ProjectionGroup):
        self.group = group
        self._input: Optional[Tensor] = None
        self._pending: Dict[str, Tensor] = {}

    def output(self, name: str, x: Tensor) -> Tensor:
        if x is not self._input or name not in self._pending:
            params = lora_parameters(self.group.projections)
            outputs = _FusedProjectionsFunction.apply(x, self.group, _records_graph(), *params)
            self._pending = dict(zip(self.group.names, outputs))
            self._input = x
        out = self._pending.pop(name)
        if not self._pending:  # all consumed: drop the references so nothing outlives the layer call
            self._input = None
        return out


class FusedMLPForward(_FusedForward):
    def __init__(self, group: MLPGroup):
        self.group = group
        # Set by opt.recompute_skips_mlp_down (optkit/opt/recompute_skip.py): True when this call's output is
        # never read, and then down_proj's base and B GEMMs are skipped. Never asked in a compiled graph.
        self.skip_down_when: Optional[Callable[[], bool]] = None

    def __call__(self, x: Tensor) -> Tensor:
        skip = self.skip_down_when is not None and not torch.compiler.is_compiling() and self.skip_down_when()
        return _FusedMLPFunction.apply(x, self.group, _records_graph(), skip, *self.group.lora_parameters())


def _projections(module: nn.Module, names: Sequence[str]):
    """{name: LoRAProjection} or the first reason one of them cannot be fused."""
    found = {}
    for name in names:
        sub = getattr(module, name, None)
        if sub is None:
            return f"{type(module).__name__} has no {name}"
        projection = projection_of(sub)
        if isinstance(projection, str):
            return f"{name}: {projection}"
        found[name] = projection
    return found


def _set_forward(root: nn.Module, module: nn.Module, forward: _FusedForward) -> None:
    """Install ``forward`` on ``module``; under ``optkit.patch`` it is recorded, so ``unpatch`` removes it."""
    if state_of(root) is not None:
        override_attr(root, module, "forward", forward, by="fused_lora")
    else:
        module.forward = forward


def _install_attention(root: nn.Module, attn: nn.Module) -> Optional[str]:
    groups = [(names, _projections(attn, names)) for names in (QKV_NAMES, ("o_proj",))]
    for _, projections in groups:
        if isinstance(projections, str):
            return projections  # nothing installed: QKV and O are fused together or not at all
    for names, projections in groups:
        shared = _SharedOutputs(ProjectionGroup(names, [projections[n] for n in names]))
        for name in names:
            module = getattr(attn, name)
            _set_forward(root, module, FusedProjectionForward(module, name, shared))
    return None


def _install_mlp(root: nn.Module, mlp: Optional[nn.Module], act: Union[GatedActivation, str]) -> Optional[str]:
    if isinstance(act, str) or mlp is None:
        return act if isinstance(act, str) else "no mlp"
    projections = _projections(mlp, MLP_NAMES)
    if isinstance(projections, str):
        return projections
    _set_forward(root, mlp, FusedMLPForward(MLPGroup(*(projections[n] for n in MLP_NAMES), act)))
    return None


def _activation_name(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    for key in ("hidden_activation", "hidden_act"):  # Gemma names it hidden_activation
        name = getattr(config, key, None)
        if isinstance(name, str):
            return name
    return None


def apply_fused_lora(model: nn.Module, opt_cfg) -> List[str]:
    """Install the fused LoRA forwards on every decoder layer of ``model`` (peft-wrapped); returns a log."""
    if not getattr(opt_cfg, "fused_lora", False):
        return []
    if any(isinstance(m.__dict__.get("forward"), _FusedForward) for m in model.modules()):
        raise RuntimeError("fused LoRA is already applied to this model; call remove_fused_lora(model) first")
    act = gated_activation(_activation_name(model))
    act_label = act if isinstance(act, str) else act.label
    layers = decoder_layers(model)
    skipped: Dict[str, List[int]] = {}
    n_attn = n_mlp = 0
    for index, layer in enumerate(layers):
        reason = _install_attention(model, layer.self_attn) if hasattr(layer, "self_attn") else "no self_attn"
        if reason:
            skipped.setdefault(f"attention left to peft: {reason}", []).append(index)
        else:
            n_attn += 1
        reason = _install_mlp(model, getattr(layer, "mlp", None), act)
        if reason:
            skipped.setdefault(f"MLP left to peft: {reason}", []).append(index)
        else:
            n_mlp += 1
    log = [f"fused_lora: QKV+O fused in {n_attn}/{len(layers)} layers, MLP in {n_mlp}/{len(layers)} ({act_label})"]
    log += [f"fused_lora: {why} (layers {_ranges(indices)})" for why, indices in skipped.items()]
    for line in log[1:]:  # asked for and not done: said where a user looks, not only in patch_log
        logger.warning("optkit: %s", line)
    return log


def remove_fused_lora(model: nn.Module) -> int:
    """Undo apply_fused_lora: the modules' class forwards come back. Returns how many were restored."""
    restored = 0
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _FusedForward):
            del module.forward
            restored += 1
    return restored


def _ranges(indices: Sequence[int]) -> str:
    if list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}" if len(indices) > 1 else str(indices[0])
    return ",".join(map(str, indices))
