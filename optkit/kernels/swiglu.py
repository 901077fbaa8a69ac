"""SwiGLU, ``silu(gate) * up``, forward and backward as elementwise Triton kernels.

What is fused: eager PyTorch writes ``silu(gate)`` to HBM, reads it back for the product, and autograd
keeps gate, silu(gate) and up alive for the backward (three (tokens, intermediate) tensors). Here the
forward reads gate and up once and writes the product once, saving only gate and up; the backward reads
d_out, gate and up once and writes d_gate and d_up once, recomputing the sigmoid in registers (free in a
memory-bound kernel). Math is fp32 with one rounding per output, so it is at least as accurate as eager.

Limits: gate and up must have the same shape (any leading dims); non-contiguous inputs are copied once
(e.g. halves of a fused gate_up projection); fp32/fp16/bf16 only. The output has
``promote_types(gate.dtype, up.dtype)``.

Dispatch (``_dispatch.autograd_op``): an autograd.Function when eager, the custom ops
``optkit::swiglu_fwd`` / ``optkit::swiglu_bwd`` under ``torch.compile`` (no graph break).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from optkit.kernels._dispatch import autograd_op
from optkit.kernels._launch import (
    GatedMLP,
    check_float_dtype,
    check_same_shape,
    hf_activation_name,
    launch_gated_bwd,
    launch_gated_fwd,
)

SILU_ACTIVATIONS = ("silu", "swish")


def reference_swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Plain PyTorch in the dtypes given (what the tests trust in float64)."""
    return torch.nn.functional.silu(gate) * up


# Reads n * (gate + up bytes); writes n * (out bytes).
@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: n can pass 2**31
    mask = offsets < n_elements
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


# Reads n * (d_out + gate + up bytes); writes n * (d_gate + d_up bytes).
@triton.jit
def _swiglu_bwd_kernel(d_out_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    d_out = tl.load(d_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # silu'(g) = sig(g) * (1 + g * (1 - sig(g)))
    d_gate = d_out * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(d_gate_ptr + offsets, d_gate.to(d_gate_ptr.dtype.element_ty), mask=mask)
    tl.store(d_up_ptr + offsets, (d_out * silu).to(d_up_ptr.dtype.element_ty), mask=mask)


def _swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    return launch_gated_fwd(_swiglu_fwd_kernel, gate, up)


def _swiglu_bwd(d_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return launch_gated_bwd(_swiglu_bwd_kernel, d_out, gate, up)


def _swiglu_fwd_fake(gate: Tensor, up: Tensor) -> Tensor:
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


def _swiglu_bwd_fake(d_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _swiglu_backward(bwd, ctx, d_out: Tensor) -> tuple[Tensor, Tensor]:
    return bwd(d_out, *ctx.saved_tensors)


_swiglu_op = autograd_op(
    "swiglu",
    _swiglu_fwd,
    _swiglu_bwd,
    fake_fwd=_swiglu_fwd_fake,
    fake_bwd=_swiglu_bwd_fake,
    setup_context=_save_inputs,
    backward=_swiglu_backward,
)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` elementwise; gate and up of one shape."""
    check_float_dtype("swiglu", gate=gate, up=up)
    check_same_shape("swiglu", gate=gate, up=up)
    return _swiglu_op(gate, up)


class SwiGLUMLP(GatedMLP):
    """Drop-in for Llama/Qwen/Mistral MLPs: ``down_proj(swiglu(gate_proj(x), up_proj(x)))``."""

    def gated_op(self, gate: Tensor, up: Tensor) -> Tensor:
        return swiglu(gate, up)

    @classmethod
    def from_module(cls, hf_mlp: nn.Module) -> SwiGLUMLP:
        """Keep ``hf_mlp``'s own projection modules (LoRA wrappers included); its activation must be SiLU."""
        projections = cls.projections_of(hf_mlp)
        activation = hf_activation_name(hf_mlp)
        if activation not in SILU_ACTIVATIONS:
            raise ValueError(
                f"{type(hf_mlp).__name__} uses activation {activation!r}, not SiLU; SwiGLUMLP would change the "
                "model. Use GeGLUMLP for GELU-gated MLPs"
            )
        return cls(*projections)
