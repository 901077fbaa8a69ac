"""GeGLU, ``gelu(gate) * up``, forward and backward as elementwise Triton kernels (Gemma's MLP).

What is fused: as for SwiGLU, eager PyTorch round-trips ``gelu(gate)`` through HBM and autograd keeps
three (tokens, intermediate) tensors; here the forward reads gate and up and writes the product once,
and the backward reads d_out, gate and up once and writes d_gate and d_up, recomputing the GELU and its
derivative in fp32 registers.

Both of PyTorch's forms (``torch.nn.functional.gelu(approximate=...)``):
- ``"none"``: ``g * Phi(g)`` with the normal CDF through erf (HF ``"gelu"``);
- ``"tanh"``: ``0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))`` (HF ``"gelu_pytorch_tanh"``, Gemma's).
tanh is evaluated as ``sign(u) (1 - e) / (1 + e)`` with ``e = exp(-2|u|)`` (Triton has no portable
tanh): no overflow, exact saturation, and an absolute error (~1e-7) far below a bf16/fp16 ulp.

Limits: as SwiGLU (same shapes, non-contiguous inputs copied once, fp32/fp16/bf16).

Dispatch (``_dispatch.autograd_op``): an autograd.Function when eager, the custom ops
``optkit::geglu_fwd`` / ``optkit::geglu_bwd`` under ``torch.compile`` (no graph break).
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

APPROXIMATIONS = ("none", "tanh")
# HF activation string -> the GELU form it computes (gelu_new / gelu_fast write the tanh formula out).
HF_GELU_FORMS = {
    "gelu": "none",
    "gelu_python": "none",
    "gelu_pytorch_tanh": "tanh",
    "gelu_python_tanh": "tanh",
    "gelu_new": "tanh",
    "gelu_fast": "tanh",
}


def reference_geglu(gate: Tensor, up: Tensor, approximate: str = "tanh") -> Tensor:
    """Plain PyTorch in the dtypes given (what the tests trust in float64)."""
    return torch.nn.functional.gelu(gate, approximate=approximate) * up


SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
TANH_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _tanh_of_inner(gate):
    inner = SQRT_2_OVER_PI * (gate + TANH_CUBIC * gate * gate * gate)
    decay = tl.exp(-2.0 * tl.abs(inner))  # in (0, 1]: never overflows, saturates to tanh = +-1
    tanh_abs = (1.0 - decay) / (1.0 + decay)
    return tl.where(inner < 0, -tanh_abs, tanh_abs)


# gelu(g) in fp32 registers.
@triton.jit
def _gelu(gate, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        gelu = 0.5 * gate * (1.0 + _tanh_of_inner(gate))
    else:
        gelu = 0.5 * gate * (1.0 + tl.erf(gate * INV_SQRT_2))
    return gelu


# (gelu(g), gelu'(g)) in fp32 registers, sharing the tanh / erf between the two.
@triton.jit
def _gelu_with_grad(gate, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        tanh_inner = _tanh_of_inner(gate)
        gelu = 0.5 * gate * (1.0 + tanh_inner)
        d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * gate * gate)
        d_gelu = 0.5 * (1.0 + tanh_inner) + 0.5 * gate * (1.0 - tanh_inner * tanh_inner) * d_inner
    else:
        cdf = 0.5 * (1.0 + tl.erf(gate * INV_SQRT_2))
        gelu = gate * cdf
        d_gelu = cdf + gate * INV_SQRT_2PI * tl.exp(-0.5 * gate * gate)
    return gelu, d_gelu


# Reads n * (gate + up bytes); writes n * (out bytes).
@triton.jit
def _geglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n_elements, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: n can pass 2**31
    mask = offsets < n_elements
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (_gelu(gate, APPROX_TANH) * up).to(out_ptr.dtype.element_ty), mask=mask)


# Reads n * (d_out + gate + up bytes); writes n * (d_gate + d_up bytes).
@triton.jit
def _geglu_bwd_kernel(
    d_out_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr, n_elements, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    d_out = tl.load(d_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gelu, d_gelu = _gelu_with_grad(gate, APPROX_TANH)
    tl.store(d_gate_ptr + offsets, (d_out * up * d_gelu).to(d_gate_ptr.dtype.element_ty), mask=mask)
    tl.store(d_up_ptr + offsets, (d_out * gelu).to(d_up_ptr.dtype.element_ty), mask=mask)


def _check_approximate(approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate={approximate!r} is not valid; choose one of: {', '.join(APPROXIMATIONS)}")


def _geglu_fwd(gate: Tensor, up: Tensor, approximate: str) -> Tensor:
    return launch_gated_fwd(_geglu_fwd_kernel, gate, up, APPROX_TANH=approximate == "tanh")


def _geglu_bwd(d_out: Tensor, gate: Tensor, up: Tensor, approximate: str) -> tuple[Tensor, Tensor]:
    return launch_gated_bwd(_geglu_bwd_kernel, d_out, gate, up, APPROX_TANH=approximate == "tanh")


def _geglu_fwd_fake(gate: Tensor, up: Tensor, approximate: str) -> Tensor:
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


def _geglu_bwd_fake(d_out: Tensor, gate: Tensor, up: Tensor, approximate: str) -> tuple[Tensor, Tensor]:
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _geglu_setup_context(ctx, inputs, output) -> None:
    gate, up, approximate = inputs
    ctx.save_for_backward(gate, up)
    ctx.approximate = approximate


def _geglu_backward(bwd, ctx, d_out: Tensor):
    d_gate, d_up = bwd(d_out, *ctx.saved_tensors, ctx.approximate)
    return d_gate, d_up, None


_geglu_op = autograd_op(
    "geglu",
    _geglu_fwd,
    _geglu_bwd,
    fake_fwd=_geglu_fwd_fake,
    fake_bwd=_geglu_bwd_fake,
    setup_context=_geglu_setup_context,
    backward=_geglu_backward,
)


def geglu(gate: Tensor, up: Tensor, approximate: str = "tanh") -> Tensor:
    """``gelu(gate, approximate) * up`` elementwise; gate and up of one shape."""
    _check_approximate(approximate)
    check_float_dtype("geglu", gate=gate, up=up)
    check_same_shape("geglu", gate=gate, up=up)
    return _geglu_op(gate, up, approximate)


class GeGLUMLP(GatedMLP):
    """Drop-in for Gemma-style MLPs: ``down_proj(geglu(gate_proj(x), up_proj(x), approximate))``."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, approximate: str = "tanh"):
        super().__init__(gate_proj, up_proj, down_proj)
        _check_approximate(approximate)
        self.approximate = approximate

    def gated_op(self, gate: Tensor, up: Tensor) -> Tensor:
        return geglu(gate, up, self.approximate)

    @classmethod
    def from_module(cls, hf_mlp: nn.Module, approximate: str | None = None) -> GeGLUMLP:
        """Keep ``hf_mlp``'s own projection modules (LoRA wrappers included).

        ``approximate`` None reads the form from the MLP's activation; given, it must agree with it
        (when the activation is known), since a different GELU form would change the model.
        """
        projections = cls.projections_of(hf_mlp)
        activation = hf_activation_name(hf_mlp)
        form = HF_GELU_FORMS.get(activation) if activation is not None else None
        if activation is not None and form is None:
            raise ValueError(
                f"{type(hf_mlp).__name__} uses activation {activation!r}, not GELU; GeGLUMLP would change the "
                f"model (GELU forms: {', '.join(HF_GELU_FORMS)}). Use SwiGLUMLP for SiLU-gated MLPs"
            )
        if approximate is None:
            if form is None:
                raise ValueError(f"can't tell {type(hf_mlp).__name__}'s GELU form; pass approximate='tanh' or 'none'")
            approximate = form
        _check_approximate(approximate)
        if form is not None and approximate != form:
            raise ValueError(
                f"approximate={approximate!r} but {type(hf_mlp).__name__} computes {activation!r} ({form!r})"
            )
        return cls(*projections, approximate=approximate)
