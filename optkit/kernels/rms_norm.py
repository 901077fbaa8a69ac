"""RMSNorm, forward and backward, as Triton kernels: ``x * rsqrt(mean(x^2) + eps) * (offset + weight)``.

What is fused: eager PyTorch runs RMSNorm as ~6 kernels (upcast, square, mean, rsqrt, multiply, cast,
weight multiply), each a round trip through HBM, and autograd saves fp32 intermediates of the full
activation size. Here the forward reads x once and writes y once (plus 4 bytes per row of rstd, the only
saved statistic); the backward reads x, dy and rstd once and writes dx, with the weight gradient
accumulated in fp32 registers per program and reduced across programs afterwards (a small
(programs, hidden) fp32 buffer, not a (rows, hidden) one). Both are memory-bound: the bytes above are
the whole cost.

Rounding follows the HF module being replaced (``cast_mode``):
- ``"llama"`` (LlamaRMSNorm, Qwen2/3, Mistral): normalize in fp32, round to x's dtype, multiply by
  the weight; the output has ``promote_types(x.dtype, weight.dtype)``, like HF.
- ``"gemma"`` (Gemma2RMSNorm; use ``offset=1.0``): normalize and multiply by ``offset + weight`` all in
  fp32, round once at the end to x's dtype.
Statistics and every accumulation are fp32 in both modes.

Limits: rows of at most 65536 elements (a row is one register tile); x must be fp32/fp16/bf16; a
non-contiguous x is copied once to rows with unit stride. ``weight`` is required.

Launch config (``RmsNormLaunch``): rows per program, warps and the backward's programs per SM;
``default_rms_norm_launch`` derives them from the shape, and ``launch_rms_norm_fwd`` / ``launch_rms_norm_bwd``
take another one (scripts/tune_kernels.py sweeps them on a GPU).

Dispatch (``_dispatch.autograd_op``): eager calls go through a ``torch.autograd.Function`` (about 10x
less host time than a custom op's dispatcher round trip); under ``torch.compile`` the same launchers
run as the custom ops ``optkit::rms_norm_fwd`` / ``optkit::rms_norm_bwd`` (fake implementations give
the shapes), so a ``fullgraph=True`` compile has no graph break.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from optkit.kernels._dispatch import autograd_op
from optkit.kernels._launch import as_rows, check_float_dtype, persistent_programs, row_tile_config

CAST_MODES = ("llama", "gemma")


def reference_rms_norm(
    x: Tensor, weight: Tensor, eps: float = 1e-6, offset: float = 0.0, cast_mode: str = "llama"
) -> Tensor:
    """Plain PyTorch, in the given dtypes, with HF's rounding order (what the tests trust in float64)."""
    _check_cast_mode(cast_mode)
    x_stat = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    normed = x_stat * torch.rsqrt(x_stat.pow(2).mean(-1, keepdim=True) + eps)
    if cast_mode == "llama":
        scale = weight if offset == 0.0 else weight + offset
        return scale * normed.to(x.dtype)
    scale = weight.to(normed.dtype) + offset
    return (normed * scale).to(x.dtype)


# Reads rows*cols*(x bytes) + cols*(w bytes); writes rows*cols*(y bytes) + rows*4 (rstd).
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    weight_ptr,
    y_ptr,
    rstd_ptr,
    n_rows,
    n_cols,
    stride_x_row,
    stride_y_row,
    eps,
    offset,
    CAST_NORMALIZED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # rows*stride can pass 2**31 elements

    x = tl.load(x_ptr + rows64 * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    normed = x * rstd[:, None]
    if CAST_NORMALIZED:  # HF Llama rounds the normalized row to the input dtype before the weight
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    scale = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    y = normed * scale[None, :]
    tl.store(y_ptr + rows64 * stride_y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


# Reads rows*cols*(x + dy bytes) + rows*4 (rstd) + cols*(w bytes); writes rows*cols*(dx bytes)
# + programs*cols*4 (fp32 weight-gradient partials, summed over programs by the launcher).
@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    weight_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    n_rows,
    n_cols,
    stride_dy_row,
    stride_x_row,
    stride_dx_row,
    offset,
    CAST_NORMALIZED: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    scale = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # Grid-stride over row blocks: one launch of a few programs per SM, so the weight gradient is
    # summed in registers over many rows before one (programs, cols) partial is written.
    for row_start in range(pid * BLOCK_M, n_rows, tl.num_programs(0) * BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        normed = x * rstd[:, None]
        if COMPUTE_DW:
            if CAST_NORMALIZED:  # the weight multiplied the rounded row in the forward
                dw_acc += tl.sum(dy * normed.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
            else:
                dw_acc += tl.sum(dy * normed, axis=0)
        d_normed = dy * scale[None, :]
        # d/dx of x*rstd(x): rstd * (g - normed * mean(g * normed)) row by row
        row_dot = tl.sum(d_normed * normed, axis=1) / n_cols
        dx = (d_normed - normed * row_dot[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows64 * stride_dx_row + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=col_mask)


def _check_cast_mode(cast_mode: str) -> None:
    if cast_mode not in CAST_MODES:
        raise ValueError(f"cast_mode={cast_mode!r} is not valid; choose one of: {', '.join(CAST_MODES)}")


def _output_dtype(x: Tensor, weight: Tensor, cast_normalized: bool) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype) if cast_normalized else x.dtype


@dataclass(frozen=True)
class RmsNormLaunch:
    """How both kernels are launched: ``default_rms_norm_launch`` picks one from the shape; scripts/tune_kernels.py
    times others on a GPU (``launch_rms_norm_fwd / _bwd(..., launch=RmsNormLaunch(...))``)."""

    rows_per_program: int  # BLOCK_M; a row is one tile (BLOCK_N = its width, rounded up to a power of 2)
    num_warps: int
    programs_per_sm: int | None = None  # the backward's persistent grid; None: _launch.PROGRAMS_PER_SM


# Rows of a 7-9B model (3584-4096 wide): two rows per program at 8 warps and a backward grid of 2 programs
# per SM were fastest of scripts/tune_kernels.py's grid at 1k, 4k and 16k tokens on an H200 (backward
# 1.25-1.35x the one-row default at 4k-16k, forward equal); narrower rows keep the tile heuristic.
WIDE_ROW_LAUNCH = (2, 8, 2)


def default_rms_norm_launch(n_rows: int, n_cols: int) -> RmsNormLaunch:
    block_m, block_n, num_warps = row_tile_config(n_rows, n_cols)
    if block_n == 4096 and n_rows > 1:
        return RmsNormLaunch(*WIDE_ROW_LAUNCH)
    return RmsNormLaunch(block_m, num_warps)


def _backward_programs(device: torch.device, n_blocks: int, programs_per_sm: int | None) -> int:
    if programs_per_sm is None or device.type != "cuda":
        return persistent_programs(device, n_blocks)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_blocks, programs_per_sm * sm_count))


def launch_rms_norm_fwd(
    x: Tensor, weight: Tensor, eps: float, offset: float, cast_normalized: bool, launch: RmsNormLaunch | None = None
) -> tuple[Tensor, Tensor]:
    """(y, rstd) of the forward kernel, launched with ``launch`` (default: from the shape)."""
    x2d, weight = as_rows(x), weight.contiguous()
    n_rows, n_cols = x2d.shape
    y = torch.empty((n_rows, n_cols), dtype=_output_dtype(x, weight, cast_normalized), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y.view(x.shape), rstd.view(x.shape[:-1])
    launch = launch or default_rms_norm_launch(n_rows, n_cols)
    _, block_n, _ = row_tile_config(n_rows, n_cols)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, launch.rows_per_program),)](
        x2d,
        weight,
        y,
        rstd,
        n_rows,
        n_cols,
        x2d.stride(0),
        y.stride(0),
        eps,
        offset,
        CAST_NORMALIZED=cast_normalized,
        BLOCK_M=launch.rows_per_program,
        BLOCK_N=block_n,
        num_warps=launch.num_warps,
    )
    return y.view(x.shape), rstd.view(x.shape[:-1])


def launch_rms_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    rstd: Tensor,
    offset: float,
    cast_normalized: bool,
    compute_dw: bool,
    launch: RmsNormLaunch | None = None,
) -> tuple[Tensor, Tensor]:
    """(dx, dw) of the backward kernel, launched with ``launch`` (default: from the shape)."""
    x2d, dy2d, weight = as_rows(x), as_rows(dy), weight.contiguous()
    n_rows, n_cols = x2d.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    no_dw = weight.new_empty(0)
    if n_rows == 0:
        return dx.view(x.shape), torch.zeros_like(weight) if compute_dw else no_dw
    launch = launch or default_rms_norm_launch(n_rows, n_cols)
    _, block_n, _ = row_tile_config(n_rows, n_cols)
    n_programs = _backward_programs(x.device, triton.cdiv(n_rows, launch.rows_per_program), launch.programs_per_sm)
    rstd = rstd.reshape(-1)
    # Every program stores its row of partials (no memset needed). Without dW the kernel never touches
    # the pointer; rstd stands in, as Triton refuses the null pointer of an empty CUDA tensor.
    dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device) if compute_dw else rstd
    _rms_norm_bwd_kernel[(n_programs,)](
        dy2d,
        x2d,
        weight,
        rstd,
        dx,
        dw_partial,
        n_rows,
        n_cols,
        dy2d.stride(0),
        x2d.stride(0),
        dx.stride(0),
        offset,
        CAST_NORMALIZED=cast_normalized,
        COMPUTE_DW=compute_dw,
        BLOCK_M=launch.rows_per_program,
        BLOCK_N=block_n,
        num_warps=launch.num_warps,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else no_dw
    return dx.view(x.shape), dw


def _rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, offset: float, cast_normalized: bool) -> tuple[Tensor, Tensor]:
    return launch_rms_norm_fwd(x, weight, eps, offset, cast_normalized)


def _rms_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, offset: float, cast_normalized: bool, compute_dw: bool
) -> tuple[Tensor, Tensor]:
    return launch_rms_norm_bwd(dy, x, weight, rstd, offset, cast_normalized, compute_dw)


def _rms_norm_fwd_fake(
    x: Tensor, weight: Tensor, eps: float, offset: float, cast_normalized: bool
) -> tuple[Tensor, Tensor]:
    y = x.new_empty(x.shape, dtype=_output_dtype(x, weight, cast_normalized))
    return y, x.new_empty(x.shape[:-1], dtype=torch.float32)


def _rms_norm_bwd_fake(
    dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, offset: float, cast_normalized: bool, compute_dw: bool
) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape if compute_dw else (0,))


def _rms_norm_setup_context(ctx, inputs, output) -> None:
    x, weight, _eps, offset, cast_normalized = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset, ctx.cast_normalized = offset, cast_normalized


def _rms_norm_backward(bwd, ctx, dy: Tensor):
    x, weight, rstd = ctx.saved_tensors
    compute_dw = ctx.needs_input_grad[1]
    dx, dw = bwd(dy, x, weight, rstd, ctx.offset, ctx.cast_normalized, compute_dw)
    return dx, (dw if compute_dw else None), None, None, None


# rstd is a hidden output: saved for the backward, never returned.
_rms_norm_op = autograd_op(
    "rms_norm",
    _rms_norm_fwd,
    _rms_norm_bwd,
    fake_fwd=_rms_norm_fwd_fake,
    fake_bwd=_rms_norm_bwd_fake,
    setup_context=_rms_norm_setup_context,
    backward=_rms_norm_backward,
    hidden_outputs=1,
)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, offset: float = 0.0, cast_mode: str = "llama") -> Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps) * (offset + weight)`` over the last dim; see the module doc."""
    _check_cast_mode(cast_mode)
    check_float_dtype("rms_norm", x=x, weight=weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} must be ({x.shape[-1]},), x's last dim")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight on {weight.device}; move them together")
    return _rms_norm_op(x, weight, float(eps), float(offset), cast_mode == "llama")


class RMSNorm(nn.Module):
    """Drop-in for HF RMSNorm modules; ``from_module`` shares the HF module's ``weight`` Parameter."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0, cast_mode: str = "llama"):
        super().__init__()
        _check_cast_mode(cast_mode)
        self.weight = nn.Parameter(torch.ones(hidden_size) if offset == 0.0 else torch.zeros(hidden_size))
        self.eps, self.offset, self.cast_mode = eps, offset, cast_mode

    @classmethod
    def from_module(cls, hf_norm: nn.Module, cast_mode: str | None = None) -> RMSNorm:
        """Wrap an HF norm. ``cast_mode`` None: "gemma" (offset 1) for Gemma classes, else "llama"."""
        eps = getattr(hf_norm, "variance_epsilon", getattr(hf_norm, "eps", None))
        weight = getattr(hf_norm, "weight", None)
        if eps is None or not isinstance(weight, nn.Parameter):
            raise TypeError(
                f"{type(hf_norm).__name__} has no weight Parameter and variance_epsilon/eps; RMSNorm.from_module "
                "replaces HF RMSNorm modules (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm, Gemma2RMSNorm)"
            )
        if cast_mode is None:
            cast_mode = "gemma" if type(hf_norm).__name__.startswith("Gemma") else "llama"
        _check_cast_mode(cast_mode)
        module = cls(weight.shape[0], float(eps), 1.0 if cast_mode == "gemma" else 0.0, cast_mode)
        module.weight = weight  # the same Parameter object: optimizer state and state-dict keys carry over
        return module

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset, self.cast_mode)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}, cast_mode={self.cast_mode}"
