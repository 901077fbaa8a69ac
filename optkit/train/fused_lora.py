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
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optkit.train.adapters import decoder_layers

QKV_NAMES = ("q_proj", "k_proj", "v_proj")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- projections
@dataclass
class LoRAProjection:
    """One frozen linear (nn.Linear or bitsandbytes Linear4bit) with an optional LoRA adapter."""

    base: nn.Module
    lora_A: Optional[nn.Parameter]  # (r, in)
    lora_B: Optional[nn.Parameter]  # (out, r)
    scale: float
    _dequantizer: object = field(default=None, repr=False)  # NF4Dequantizer, prepared on first use

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0] if self.has_lora else 0

    def weight(self, dtype: torch.dtype) -> Tensor:
        """The base weight (out, in) in ``dtype``; a 4-bit weight is dequantized afresh on every call."""
        weight = self.base.weight
        if getattr(weight, "bnb_quantized", False):
            quant_state = getattr(weight, "quant_state", None) or self.base.quant_state
            if quant_state.quant_type == "nf4":
                from optkit.kernels.nf4_dequantize import NF4Dequantizer

                if torch.compiler.is_compiling():
                    return NF4Dequantizer(weight, quant_state)(dtype)
                if self._dequantizer is None or not self._dequantizer.is_for(weight, quant_state):
                    self._dequantizer = NF4Dequantizer(weight, quant_state)
                return self._dequantizer(dtype)
            from bitsandbytes.functional import dequantize_4bit

            return dequantize_4bit(weight, quant_state).to(dtype)
        return weight if weight.dtype == dtype else weight.to(dtype)

    def bias(self, dtype: torch.dtype) -> Optional[Tensor]:
        bias = self.base.bias
        return bias if bias is None or bias.dtype == dtype else bias.to(dtype)


def projection_of(module: nn.Module):
    """A LoRAProjection for ``module``, or a string saying why the fused path cannot take it."""
    from peft.tuners.lora import LoraLayer

    lora_A = lora_B = None
    scale = 0.0
    base = module
    if isinstance(module, LoraLayer):
        if module.merged:
            return "LoRA weights are merged into the base weight"
        if module.disable_adapters:
            return "adapters are disabled"
        active = [name for name in module.active_adapters if name in module.lora_A]
        if len(active) != 1:
            return f"{len(active)} active adapters (the fused path takes exactly one)"
        name = active[0]
        if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
            return "a LoRA variant (DoRA, ...) is active"
        dropout = module.lora_dropout[name]
        if not isinstance(dropout, nn.Identity):
            return f"lora_dropout={getattr(dropout, 'p', '?')} > 0 (the fused path is dropout-free)"
        base = module.get_base_layer()
        lora_A, lora_B, scale = module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name])
    if not isinstance(getattr(base, "weight", None), Tensor) or getattr(base, "in_features", None) is None:
        return f"{type(base).__name__} is not a linear layer"
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "the base weight trains (train.method=full): fused LoRA only applies to frozen base weights"
    return LoRAProjection(base, lora_A, lora_B, scale)


def _lora_parameters(projections: Sequence[LoRAProjection]) -> List[Tensor]:
    return [t for p in projections if p.has_lora for t in (p.lora_A, p.lora_B)]


@dataclass
class LoRAOperands:
    """The adapters of projections sharing an input, in the activation dtype: A stacked to (sum r, in)
    (one GEMM gives every x A^T) and each B (out, r)."""

    A: Optional[Tensor]
    Bs: List[Tensor]


class LoRAOperandCache:
    """Casts a group's adapters (fp32 parameters under peft) to the activation dtype once per step.

    A step uses them three times per layer (forward, checkpoint recompute, backward); casting and
    stacking each time was ~30 small kernels per layer per step, paid in host time (see
    scripts/gpu_host_overhead.py). The entry is keyed by every adapter's version counter and storage, so an
    optimizer step or a load invalidates it; backward drops it (the next use follows an update), so it
    lives only from a layer's forward to its backward: ~2 bytes per adapter parameter (84 MB on Llama-3-8B
    r16). Updates that bypass the version counter (bitsandbytes' 8-bit optimizers write through raw
    pointers, as does ``param.data.add_``) are covered by that drop, and by caching only in forwards that
    record a graph (grad enabled), which a backward follows; a no-grad forward (evaluation) casts afresh.
    Under torch.compile nothing is cached: the graph does its casts itself.
    """

    def __init__(self, projections: Sequence[LoRAProjection]):
        self.projections = tuple(p for p in projections if p.has_lora)
        self._key: Optional[tuple] = None
        self._operands: Optional[LoRAOperands] = None

    def _build(self, dtype: torch.dtype) -> LoRAOperands:
        if not self.projections:
            return LoRAOperands(None, [])
        A = torch.cat([p.lora_A for p in self.projections]).to(dtype)
        return LoRAOperands(A, [p.lora_B.to(dtype) for p in self.projections])

    def get(self, dtype: torch.dtype, cache: bool = True) -> LoRAOperands:
        """The operands; ``cache=False`` (a forward that records no graph) casts afresh and keeps nothing."""
        if torch.compiler.is_compiling() or not cache:
            return self._build(dtype)
        key = (dtype, *((t._version, t.data_ptr()) for p in self.projections for t in (p.lora_A, p.lora_B)))
        if key != self._key:
            self._operands, self._key = self._build(dtype), key
        return self._operands

    def drop(self) -> None:
        self._key = self._operands = None


_ZERO = {}


def _scaled_mm(a: Tensor, b: Tensor, scale: float, out: Optional[Tensor] = None) -> Tensor:
    """``scale * (a @ b)`` in one GEMM (alpha in the epilogue: one rounding, no extra kernel); under
    torch.compile a plain product (Dynamo refuses ``out=`` on a column slice; Inductor fuses the scale)."""
    if torch.compiler.is_compiling():
        result = (a @ b) * scale
        return result if out is None else out.copy_(result)
    key = (a.device, a.dtype)
    zero = _ZERO.get(key)
    if zero is None:  # beta=0: addmm never reads it; a cached scalar avoids a fill kernel per call
        zero = _ZERO[key] = torch.zeros((), device=a.device, dtype=a.dtype)
    if out is None:
        return torch.addmm(zero, a, b, beta=0, alpha=scale)
    return torch.addmm(zero, a, b, beta=0, alpha=scale, out=out)


def _project(x: Tensor, projections: Sequence[LoRAProjection],
             operands: LoRAOperands) -> Tuple[List[Tensor], Optional[Tensor]]:
    """Forward of projections sharing the input ``x`` (N, in): outputs and x A^T (N, sum r) for backward."""
    xa = x @ operands.A.t() if operands.A is not None else None
    outputs, col, lora_index = [], 0, 0
    for p in projections:
        y = F.linear(x, p.weight(x.dtype), p.bias(x.dtype))
        if p.has_lora:
            y.addmm_(xa[:, col:col + p.rank], operands.Bs[lora_index].t(), alpha=p.scale)
            col += p.rank
            lora_index += 1
        outputs.append(y)
    return outputs, xa


def _project_backward(x: Tensor, xa: Optional[Tensor], grads: Sequence[Tensor],
                      projections: Sequence[LoRAProjection], operands: LoRAOperands, need_dx: bool):
    """(dx or None, [dA, dB, ...] in the order of ``_lora_parameters``) for ``_project``."""
    dx, dBs, col, lora_index = None, [], 0, 0
    # s * dy B for every adapter, side by side in one (N, sum r) buffer: the dA of all of them is then one
    # GEMM. Eager writes each into its columns; a compiled graph concatenates (Dynamo refuses out= slices).
    compiling = torch.compiler.is_compiling()
    dyB = None
    if operands.A is not None:
        dyB = [] if compiling else x.new_empty(x.shape[0], operands.A.shape[0], dtype=grads[0].dtype)
    for p, dy in zip(projections, grads):
        if need_dx:
            weight = p.weight(dy.dtype)
            dx = dy @ weight if dx is None else dx.addmm_(dy, weight)
            del weight  # a dequantized weight is freed before the next one is made
        if p.has_lora:
            dBs.append(_scaled_mm(dy.t(), xa[:, col:col + p.rank], p.scale))  # (out, r)
            if compiling:
                dyB.append(_scaled_mm(dy, operands.Bs[lora_index], p.scale))
            else:
                _scaled_mm(dy, operands.Bs[lora_index], p.scale, out=dyB[:, col:col + p.rank])  # (N, r)
            col += p.rank
            lora_index += 1
    d_lora: List[Tensor] = []
    if dyB is not None:
        dyB = torch.cat(dyB, dim=1) if compiling else dyB
        params = _lora_parameters(projections)
        dA = (dyB.t() @ x).to(params[0].dtype)  # (sum r, in): all projections' dA in one GEMM, one cast
        if need_dx:
            dx.addmm_(dyB, operands.A)
        dAs = dA.split([p.rank for p in projections if p.has_lora])
        d_lora = [g for dA_i, dB_i, B in zip(dAs, dBs, params[1::2]) for g in (dA_i, dB_i.to(B.dtype))]
    return dx, d_lora


class ProjectionGroup:
    """Projections that read the same input (Q, K, V; or O alone), with their output names."""

    def __init__(self, names: Sequence[str], projections: Sequence[LoRAProjection]):
        self.names = tuple(names)
        self.projections = tuple(projections)
        self.operands = LoRAOperandCache(self.projections)


class _FusedProjectionsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProjectionGroup, cache: bool, *lora_params: Tensor):
        x2d = x.reshape(-1, x.shape[-1])
        outputs, xa = _project(x2d, group.projections, group.operands.get(x.dtype, cache))
        ctx.group = group
        ctx.save_for_backward(x, xa)
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x, xa = ctx.saved_tensors
        x2d = x.reshape(-1, x.shape[-1])
        dys = [g.reshape(-1, g.shape[-1]) for g in grads]
        group = ctx.group
        dx, d_lora = _project_backward(x2d, xa, dys, group.projections, group.operands.get(dys[0].dtype),
                                       ctx.needs_input_grad[0])
        group.operands.drop()
        return (dx.view_as(x) if dx is not None else None, None, None, *d_lora)


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
    # (see the micro table of scripts/gpu_host_overhead.py); compiled graphs need the opaque op.
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
        return _kernel_or_torch("geglu", (approximate,), lambda g, u: F.gelu(g, approximate=approximate) * u,
                                f"gelu(gate, {approximate}) * up")
    return f"activation {name!r} is not gated SiLU/GELU"


class MLPGroup:
    def __init__(self, gate: LoRAProjection, up: LoRAProjection, down: LoRAProjection, act: GatedActivation):
        self.gate_up = (gate, up)
        self.down = (down,)
        self.act = act
        self.gate_up_operands = LoRAOperandCache(self.gate_up)
        self.down_operands = LoRAOperandCache(self.down)

    def lora_parameters(self) -> List[Tensor]:
        return _lora_parameters(self.gate_up) + _lora_parameters(self.down)


class _FusedMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: MLPGroup, cache: bool, *lora_params: Tensor):
        x2d = x.reshape(-1, x.shape[-1])
        (gate, up), xa_gate_up = _project(x2d, group.gate_up, group.gate_up_operands.get(x.dtype, cache))
        h = group.act.forward(gate, up)  # (N, I), not saved: recomputed in backward from gate and up
        (y,), xa_down = _project(h, group.down, group.down_operands.get(h.dtype, cache))
        ctx.group = group
        ctx.save_for_backward(x, gate, up, xa_gate_up, xa_down)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, gate, up, xa_gate_up, xa_down = ctx.saved_tensors
        group = ctx.group
        h = group.act.forward(gate, up)
        dh, d_down = _project_backward(h, xa_down, [dy.reshape(-1, dy.shape[-1])], group.down,
                                       group.down_operands.get(h.dtype), True)
        del h
        d_gate, d_up = group.act.backward(dh, gate, up)
        del dh
        x2d = x.reshape(-1, x.shape[-1])
        dx, d_gate_up = _project_backward(x2d, xa_gate_up, [d_gate, d_up], group.gate_up,
                                          group.gate_up_operands.get(d_gate.dtype), ctx.needs_input_grad[0])
        group.down_operands.drop()
        group.gate_up_operands.drop()
        return (dx.view_as(x) if dx is not None else None, None, None, *d_gate_up, *d_down)


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
            params = _lora_parameters(self.group.projections)
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

    def __call__(self, x: Tensor) -> Tensor:
        return _FusedMLPFunction.apply(x, self.group, _records_graph(), *self.group.lora_parameters())


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
    from optkit import patch as patcher

    if patcher._state_of(root) is not None:
        patcher.override_attr(root, module, "forward", forward, by="fused_lora")
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
