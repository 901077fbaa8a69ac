"""A LoRA projection ``y = x W^T + b + s (x A^T) B^T`` as plain tensor math, for fused LoRA's Functions.

- ``LoRAProjection``: one frozen base linear (nn.Linear, or a bitsandbytes Linear4bit dequantized on each
  use by a prepared ``NF4Dequantizer``) and its adapter; ``projection_of`` reads one from a peft layer.
- ``LoRAOperandCache``: the adapters of projections sharing an input, cast to the activation dtype once
  per step (why and when it is invalidated: its docstring).
- ``project`` / ``project_backward``: forward and backward of projections sharing an input: one GEMM for
  every x A^T, one for every dA, LoRA scales in the GEMM epilogue. No autograd inside: the callers are
  autograd.Functions (optkit.opt.fused_lora), which save what backward needs. Projections grouped by
  opt.fused_lora_grouped_gemm run their base GEMM as one (optkit.opt.grouped_base_gemm.GroupedBase).
- ``autocast_dtype`` / ``autocast_off``: under ``torch.autocast`` those Functions cast their input to the
  autocast dtype and run this math with autocast off, like ``torch.amp.custom_fwd(cast_inputs=...)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LoRAProjection:
    """One frozen linear (nn.Linear or bitsandbytes Linear4bit) with an optional LoRA adapter."""

    base: nn.Module
    # The adapter weights, or the modules holding them as ``.weight``: a module's weight is read on every
    # use, because FSDP2 swaps a sharded module's parameter objects (the sharded DTensor between steps,
    # the all-gathered tensor inside forward and backward), so a tensor kept from patch time goes stale.
    adapter_A: Union[Tensor, nn.Module, None]  # (r, in)
    adapter_B: Union[Tensor, nn.Module, None]  # (out, r)
    scale: float
    _dequantizer: object = field(default=None, repr=False)  # NF4Dequantizer, prepared on first use
    # The GroupedBase (optkit.opt.grouped_base_gemm) running this projection's base GEMM together with the
    # others that read its input, when opt.fused_lora_grouped_gemm grouped it; None: its own GEMM.
    grouped: object = field(default=None, repr=False, compare=False)

    @property
    def lora_A(self) -> Optional[Tensor]:
        return self.adapter_A.weight if isinstance(self.adapter_A, nn.Module) else self.adapter_A

    @property
    def lora_B(self) -> Optional[Tensor]:
        return self.adapter_B.weight if isinstance(self.adapter_B, nn.Module) else self.adapter_B

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0] if self.has_lora else 0

    def quantized(self) -> Optional[tuple]:
        """(packed weight, QuantState) of a bitsandbytes 4-bit base, None for a plain weight."""
        weight = self.base.weight
        # FSDP2 hands a Linear4bit its gathered packed bytes as a plain tensor (no Params4bit, no quant_state):
        # the module's own quant_state, which bitsandbytes keeps for exactly that case, says it is 4-bit.
        if not (getattr(weight, "bnb_quantized", False) or getattr(self.base, "quant_state", None) is not None):
            return None
        quant_state = getattr(weight, "quant_state", None) or self.base.quant_state
        if getattr(quant_state, "packing_format_for_cpu", False):
            weight, quant_state = _undo_cpu_inference_packing(self.base)
        return weight, quant_state

    def weight(self, dtype: torch.dtype) -> Tensor:
        """The base weight (out, in) in ``dtype``; a 4-bit weight is dequantized afresh on every call."""
        quantized = self.quantized()
        if quantized is None:
            weight = self.base.weight
            return weight if weight.dtype == dtype else weight.to(dtype)
        weight, quant_state = quantized
        if quant_state.quant_type == "nf4":
            from optkit.kernels.nf4_dequantize import NF4Dequantizer, nf4_dequantize

            if torch.compiler.is_compiling():  # Dynamo cannot check a kept dequantizer (data_ptr)
                return nf4_dequantize(weight, quant_state, dtype)
            if self._dequantizer is None or not self._dequantizer.is_for(weight, quant_state):
                self._dequantizer = NF4Dequantizer(weight, quant_state)
            return self._dequantizer(dtype)
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight, quant_state).to(dtype)

    def bias(self, dtype: torch.dtype) -> Optional[Tensor]:
        bias = self.base.bias
        return bias if bias is None or bias.dtype == dtype else bias.to(dtype)


def _undo_cpu_inference_packing(base: nn.Module):
    """bitsandbytes' CPU inference path (a Linear4bit forward in eval mode without grad: a sanity generation,
    Trainer's evaluation) repacks the weight into its own layout in place; put NF4 back the way bitsandbytes
    itself does before ``.cuda()`` or saving, so the next training step dequantizes real NF4 codes."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = base.weight
    weight.data, quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if not quant_state.nested:
        # bitsandbytes 0.50's inverse leaves the block scales as its repack stored them, (in / blocksize, out) in
        # bf16, so a layer with in_features > blocksize gets the wrong scale per block; NF4 keeps them in block
        # order in fp32 (values exact where the weights were bf16, whose absmax is a bf16 number).
        quant_state.absmax = quant_state.absmax.t().reshape(-1).float()
    weight.quant_state = quant_state
    if getattr(base, "quant_state", None) is not None:
        base.quant_state = quant_state
    return weight, quant_state


def projection_of(module: nn.Module):
    """A LoRAProjection for ``module``, or a string saying why the fused path cannot take it."""
    from peft.tuners.lora import LoraLayer

    lora_A = lora_B = None
    scale = 0.0
    base = module
    if isinstance(module, LoraLayer):
        if module.merged:
            return "LoRA weights are merged into the base weight (unmerge_adapter() before patching fuses them)"
        if module.disable_adapters:
            return "adapters are disabled"
        active = [name for name in module.active_adapters if name in module.lora_A]
        if len(active) != 1:
            return f"{len(active)} active adapters (the fused path takes exactly one: set_adapter(name))"
        name = active[0]
        if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
            return "a LoRA variant is active (DoRA, ...: LoraConfig(use_dora=False) fuses it)"
        dropout = module.lora_dropout[name]
        if not isinstance(dropout, nn.Identity):
            p = getattr(dropout, "p", "?")
            return f"lora_dropout={p} > 0 (the fused path is dropout-free: LoraConfig(lora_dropout=0.0) fuses it)"
        base = module.get_base_layer()
        lora_A, lora_B, scale = module.lora_A[name], module.lora_B[name], float(module.scaling[name])
    if not isinstance(getattr(base, "weight", None), Tensor) or getattr(base, "in_features", None) is None:
        return f"{type(base).__name__} is not a linear layer"
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "the base weight trains (train.method=full): fused LoRA only applies to frozen base weights"
    return LoRAProjection(base, lora_A, lora_B, scale)


def lora_parameters(projections: Sequence[LoRAProjection]) -> List[Tensor]:
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
    stacking each time was ~30 small kernels per layer per step, paid in host time (a profiled point's
    profile_device_idle_share shows it). The entry is keyed by every adapter's version counter and storage, so an
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


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype to compute on ``x`` in: inside an enabled ``torch.autocast`` region its dtype (what a linear
    there would run in, as ``torch.amp.custom_fwd(cast_inputs=...)`` casts), otherwise ``x``'s own."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def autocast_off(device_type: str):
    """A context with autocast off: the math here picks its dtypes itself (autocast would recast the adapter
    operands per GEMM, and its addmm_ / out= GEMMs refuse mixed dtypes)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


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


def _grouped_base(projections: Sequence[LoRAProjection]):
    """The GroupedBase running exactly these projections' base GEMM as one, or None."""
    group = projections[0].grouped
    return group if group is not None and group.serves(projections) else None


def project(
    x: Tensor, projections: Sequence[LoRAProjection], operands: LoRAOperands
) -> Tuple[List[Tensor], Optional[Tensor]]:
    """Forward of projections sharing the input ``x`` (N, in): outputs and x A^T (N, sum r) for backward.
    Grouped projections get their base outputs from one GEMM (views of its output, see GroupedBase)."""
    xa = x @ operands.A.t() if operands.A is not None else None
    group = _grouped_base(projections)
    bases = group.forward(x) if group is not None else None
    outputs, col, lora_index = [], 0, 0
    for i, p in enumerate(projections):
        y = bases[i] if bases is not None else F.linear(x, p.weight(x.dtype), p.bias(x.dtype))
        if p.has_lora:
            y.addmm_(xa[:, col : col + p.rank], operands.Bs[lora_index].t(), alpha=p.scale)
            col += p.rank
            lora_index += 1
        outputs.append(y)
    return outputs, xa


def _base_input_grad(grads: Sequence[Tensor], projections: Sequence[LoRAProjection]) -> Tensor:
    """sum_i dy_i W_i: one GEMM for grouped projections, else one per projection accumulated."""
    group = _grouped_base(projections)
    dx = group.input_grad(grads) if group is not None else None
    if dx is None:
        for p, dy in zip(projections, grads):
            weight = p.weight(dy.dtype)
            dx = dy @ weight if dx is None else dx.addmm_(dy, weight)
            del weight  # a dequantized weight is freed before the next one is made
    return dx


def project_backward(
    x: Tensor,
    xa: Optional[Tensor],
    grads: Sequence[Tensor],
    projections: Sequence[LoRAProjection],
    operands: LoRAOperands,
    need_dx: bool,
):
    """(dx or None, [dA, dB, ...] in the order of ``lora_parameters``) for ``project``."""
    dx = _base_input_grad(grads, projections) if need_dx else None
    dBs, col, lora_index = [], 0, 0
    # s * dy B for every adapter, side by side in one (N, sum r) buffer: the dA of all of them is then one
    # GEMM. Eager writes each into its columns; a compiled graph concatenates (Dynamo refuses out= slices).
    compiling = torch.compiler.is_compiling()
    dyB = None
    if operands.A is not None:
        dyB = [] if compiling else x.new_empty(x.shape[0], operands.A.shape[0], dtype=grads[0].dtype)
    for p, dy in zip(projections, grads):
        if p.has_lora:
            dBs.append(_scaled_mm(dy.t(), xa[:, col : col + p.rank], p.scale))  # (out, r)
            if compiling:
                dyB.append(_scaled_mm(dy, operands.Bs[lora_index], p.scale))
            else:
                _scaled_mm(dy, operands.Bs[lora_index], p.scale, out=dyB[:, col : col + p.rank])  # (N, r)
            col += p.rank
            lora_index += 1
    d_lora: List[Tensor] = []
    if dyB is not None:
        dyB = torch.cat(dyB, dim=1) if compiling else dyB
        params = lora_parameters(projections)
        dA = (dyB.t() @ x).to(params[0].dtype)  # (sum r, in): all projections' dA in one GEMM, one cast
        if need_dx:
            dx.addmm_(dyB, operands.A)
        dAs = dA.split([p.rank for p in projections if p.has_lora])
        d_lora = [g for dA_i, dB_i, B in zip(dAs, dBs, params[1::2]) for g in (dA_i, dB_i.to(B.dtype))]
    return dx, d_lora
