"""Rotary position embedding (HF ``rotate_half`` layout) for q and k in one Triton kernel, both passes.

What is fused: HF's ``apply_rotary_pos_emb`` runs ~10 eager kernels per call (two slices, a negation,
a cat for ``rotate_half``, two multiplies and an add, for q and again for k), materializing the
rotated copy and two products in HBM; autograd replays as many. Here one program per token loads that
token's cos/sin row once and rotates every q head and every k head (GQA: any Hq, Hkv), so q, k, cos
and sin are each read once and q_rot, k_rot written once. The backward is the same kernel rotating by
-sin (the transpose of a rotation), so it costs what the forward costs.

Layout: q ``(B, Hq, S, D)``, k ``(B, Hkv, S, D)``, any strides on the first three dims (HF's
``view(B, S, H, D).transpose(1, 2)`` views are read in place); outputs keep the input's memory layout
(``empty_like``). cos/sin ``(S, D)`` or ``(B or 1, S, D)``, e.g. gathered per token for packed
sequences. Math is fp32; outputs have ``promote_types(q.dtype, cos.dtype)`` like HF.

Limits: D even and at most 1024; a q/k/grad with a non-unit last stride is copied first; cos/sin get
no gradient (HF computes them from a buffer under no_grad; passing ones that require grad is an error).

In place (``apply_rotary(..., inplace=True)``): the same kernel with q_out = q and k_out = k, and in
backward the gradients rotated where they arrive. The bytes moved are the same; what goes is the
allocation of q_rot, k_rot (and dq, dk), i.e. two activation-sized buffers per call and their allocator
traffic, which is what Liger's RoPE does too. Its own autograd.Function (``_RopeInPlaceFunction``).

Launch config (``RopeLaunch``): heads per tile, warps and tokens per program; ``default_rope_launch``
derives them from the shape, and ``launch_rope`` takes another one (scripts/tune_kernels.py sweeps them).

Dispatch (``_dispatch.autograd_op``): an autograd.Function when eager, the custom ops
``optkit::rope_fwd`` / ``optkit::rope_bwd`` under ``torch.compile`` (no graph break).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.graph import increment_version

from optkit.kernels._dispatch import autograd_op
from optkit.kernels._launch import TILE_ELEMENTS, check_float_dtype, warps_for

MAX_HEAD_DIM = 1024


def reference_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """HF's ``apply_rotary_pos_emb`` (unsqueeze_dim=1) in plain PyTorch, in the dtypes given."""

    def rotate_half(x: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = _batched(cos).unsqueeze(1), _batched(sin).unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _batched(t: Tensor) -> Tensor:
    return t.unsqueeze(0) if t.dim() == 2 else t


# Rotates one token's heads [0, n_heads) of one tensor, BLOCK_H heads at a time; the caller has cos/sin.
@triton.jit
def _rotate_token_heads(
    in_ptr,
    out_ptr,
    n_heads,
    stride_in_h,
    stride_out_h,
    half,
    cos_lo,
    cos_hi,
    sin_lo,
    sin_hi,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dim_mask = dims < half
    dtype = out_ptr.dtype.element_ty
    for head_start in range(0, n_heads, BLOCK_H):
        heads = (head_start + tl.arange(0, BLOCK_H))[:, None]
        mask = (heads < n_heads) & dim_mask
        heads64 = heads.to(tl.int64)  # (B, H, S, D) layout: heads * stride_h passes 2**31 past S = 512 K
        in_lo = in_ptr + heads64 * stride_in_h + dims
        x_lo = tl.load(in_lo, mask=mask, other=0.0).to(tl.float32)
        x_hi = tl.load(in_lo + half, mask=mask, other=0.0).to(tl.float32)
        out_lo = out_ptr + heads64 * stride_out_h + dims
        tl.store(out_lo, (x_lo * cos_lo - x_hi * sin_lo).to(dtype), mask=mask)
        tl.store(out_lo + half, (x_hi * cos_hi + x_lo * sin_hi).to(dtype), mask=mask)


# Per token reads (Hq + Hkv) * D elements of q/k plus 2 * D of cos/sin; writes (Hq + Hkv) * D elements.
# In place (q_out is q, k_out is k) is safe: every element is loaded before the same program stores it.
@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    n_tokens,
    seq_len,
    n_heads_q,
    n_heads_k,
    half,
    stride_q_b,
    stride_q_h,
    stride_q_s,
    stride_k_b,
    stride_k_h,
    stride_k_s,
    stride_qo_b,
    stride_qo_h,
    stride_qo_s,
    stride_ko_b,
    stride_ko_h,
    stride_ko_s,
    stride_cos_b,
    stride_cos_s,
    BACKWARD: tl.constexpr,
    TOKENS_PER_PROGRAM: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dim_mask = dims < half
    for i in tl.static_range(TOKENS_PER_PROGRAM):
        token = tl.program_id(0) * TOKENS_PER_PROGRAM + i
        if token < n_tokens:
            b = (token // seq_len).to(tl.int64)  # int64: b * stride_b can pass 2**31 elements
            s = (token % seq_len).to(tl.int64)
            cs_row = b * stride_cos_b + s * stride_cos_s + dims
            cos_lo = tl.load(cos_ptr + cs_row, mask=dim_mask, other=0.0).to(tl.float32)
            cos_hi = tl.load(cos_ptr + cs_row + half, mask=dim_mask, other=0.0).to(tl.float32)
            sin_lo = tl.load(sin_ptr + cs_row, mask=dim_mask, other=0.0).to(tl.float32)
            sin_hi = tl.load(sin_ptr + cs_row + half, mask=dim_mask, other=0.0).to(tl.float32)
            if BACKWARD:
                # Forward: y_lo = x_lo*c_lo - x_hi*s_lo, y_hi = x_hi*c_hi + x_lo*s_hi. Its transpose is the same
                # map with s_lo' = -s_hi and s_hi' = -s_lo (for HF's cos/sin, whose halves are equal: -sin).
                sin_lo, sin_hi = -sin_hi, -sin_lo
            _rotate_token_heads(
                q_ptr + b * stride_q_b + s * stride_q_s,
                q_out_ptr + b * stride_qo_b + s * stride_qo_s,
                n_heads_q,
                stride_q_h,
                stride_qo_h,
                half,
                cos_lo,
                cos_hi,
                sin_lo,
                sin_hi,
                BLOCK_HQ,
                BLOCK_HALF,
            )
            _rotate_token_heads(
                k_ptr + b * stride_k_b + s * stride_k_s,
                k_out_ptr + b * stride_ko_b + s * stride_ko_s,
                n_heads_k,
                stride_k_h,
                stride_ko_h,
                half,
                cos_lo,
                cos_hi,
                sin_lo,
                sin_hi,
                BLOCK_HK,
                BLOCK_HALF,
            )


ROPE_HEADS_PER_TILE = 8
ROPE_WARPS = 4


@dataclass(frozen=True)
class RopeLaunch:
    """How the kernel is launched: ``default_rope_launch`` picks one from the shape; scripts/tune_kernels.py
    times others on a GPU (``launch_rope(..., launch=RopeLaunch(...))``)."""

    max_heads_per_tile: int  # BLOCK_HQ / BLOCK_HK at most this: heads rotated per (heads x D/2) tile
    num_warps: int
    tokens_per_program: int = 1  # tokens one program rotates in turn (fewer, longer programs)


def default_rope_launch(n_heads_q: int, n_heads_k: int, head_dim: int) -> RopeLaunch:
    """One program per token. Its heads go through a (heads x D/2) tile per half of at most
    ROPE_HEADS_PER_TILE heads at 4 warps: of scripts/tune_kernels.py's grid on an H200, 8 heads at 4 warps
    was fastest at D=128 and D=256, 1k-16k tokens (1.13-1.29x the earlier one-tile-of-4096 choice at 4k-16k):
    more, smaller passes keep more programs resident per SM."""
    block_half = triton.next_power_of_2(head_dim // 2)
    max_block_h = max(1, min(ROPE_HEADS_PER_TILE, TILE_ELEMENTS // (2 * block_half)))
    widest = min(triton.next_power_of_2(max(n_heads_q, n_heads_k)), max_block_h)
    small = widest < max_block_h  # fewer heads than a tile holds (tiny models): size the warps to the tile
    return RopeLaunch(max_block_h, min(ROPE_WARPS, warps_for(2 * widest * block_half)) if small else ROPE_WARPS)


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _alloc_like(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Output in ``t``'s memory layout (HF's eager ops preserve it too); fake and real agree on it."""
    return torch.empty_like(_unit_last_stride(t), dtype=dtype)


def _cos_sin_rows(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin as (B or 1, S, D) with unit last stride and identical strides (the kernel shares them)."""
    cos, sin = _batched(cos), _batched(sin)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def launch_rope(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    q_out: Tensor,
    k_out: Tensor,
    backward: bool = False,
    launch: RopeLaunch | None = None,
) -> tuple[Tensor, Tensor]:
    """The raw launch: rotate q, k (``backward``: by the transpose) into q_out, k_out, which may be q, k
    themselves. Every tensor needs a unit last stride; cos/sin as ``_cos_sin_rows`` gives them."""
    batch, n_heads_q, seq_len, head_dim = q.shape
    n_tokens = batch * seq_len
    if n_tokens == 0:
        return q_out, k_out
    launch = launch or default_rope_launch(n_heads_q, k.shape[1], head_dim)
    block_half = triton.next_power_of_2(head_dim // 2)
    block_hq = min(triton.next_power_of_2(n_heads_q), launch.max_heads_per_tile)
    block_hk = min(triton.next_power_of_2(k.shape[1]), launch.max_heads_per_tile)
    stride_cos_b = cos.stride(0) if cos.shape[0] > 1 else 0
    _rope_kernel[(triton.cdiv(n_tokens, launch.tokens_per_program),)](
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        n_tokens,
        seq_len,
        n_heads_q,
        k.shape[1],
        head_dim // 2,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        q_out.stride(0),
        q_out.stride(1),
        q_out.stride(2),
        k_out.stride(0),
        k_out.stride(1),
        k_out.stride(2),
        stride_cos_b,
        cos.stride(1),
        BACKWARD=backward,
        TOKENS_PER_PROGRAM=launch.tokens_per_program,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_HALF=block_half,
        num_warps=launch.num_warps,
    )
    return q_out, k_out


def _launch_rope(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_out_dtype: torch.dtype, k_out_dtype: torch.dtype, backward: bool
) -> tuple[Tensor, Tensor]:
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    cos, sin = _cos_sin_rows(cos, sin)
    q_out, k_out = _alloc_like(q, q_out_dtype), _alloc_like(k, k_out_dtype)
    return launch_rope(q, k, cos, sin, q_out, k_out, backward)


def _rope_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    q_dtype, k_dtype = torch.promote_types(q.dtype, cos.dtype), torch.promote_types(k.dtype, cos.dtype)
    return _launch_rope(q, k, cos, sin, q_dtype, k_dtype, backward=False)


def _rope_bwd(
    dq_rot: Tensor, dk_rot: Tensor, cos: Tensor, sin: Tensor, q_dtype: torch.dtype, k_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    return _launch_rope(dq_rot, dk_rot, cos, sin, q_dtype, k_dtype, backward=True)


def _rope_fwd_fake(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    q_dtype, k_dtype = torch.promote_types(q.dtype, cos.dtype), torch.promote_types(k.dtype, cos.dtype)
    return _alloc_like(q, q_dtype), _alloc_like(k, k_dtype)


def _rope_bwd_fake(
    dq_rot: Tensor, dk_rot: Tensor, cos: Tensor, sin: Tensor, q_dtype: torch.dtype, k_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    return _alloc_like(dq_rot, q_dtype), _alloc_like(dk_rot, k_dtype)


def _rope_setup_context(ctx, inputs, output) -> None:
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.q_dtype, ctx.k_dtype = q.dtype, k.dtype


def _rope_backward(bwd, ctx, dq_rot: Tensor, dk_rot: Tensor):
    cos, sin = ctx.saved_tensors
    dq, dk = bwd(dq_rot, dk_rot, cos, sin, ctx.q_dtype, ctx.k_dtype)
    return dq, dk, None, None


_rope_op = autograd_op(
    "rope",
    _rope_fwd,
    _rope_bwd,
    fake_fwd=_rope_fwd_fake,
    fake_bwd=_rope_bwd_fake,
    setup_context=_rope_setup_context,
    backward=_rope_backward,
)


def _check_rope_inputs(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    check_float_dtype("apply_rotary", q=q, k=k, cos=cos, sin=sin)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rotary: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, H, S, D), HF's layout")
    batch, _, seq_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"apply_rotary: k {tuple(k.shape)} must match q {tuple(q.shape)} except in heads")
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"apply_rotary: head_dim {head_dim} must be even and at most {MAX_HEAD_DIM}")
    if cos.shape != sin.shape or cos.dim() not in (2, 3) or cos.shape[-2:] != (seq_len, head_dim):
        raise ValueError(
            f"apply_rotary: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must both be (S, D) or (B, S, D) "
            f"with S={seq_len}, D={head_dim}"
        )
    if cos.dim() == 3 and cos.shape[0] not in (1, batch):
        raise ValueError(f"apply_rotary: cos/sin batch {cos.shape[0]} must be 1 or q's batch {batch}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rotary: cos/sin get no gradient here; pass cos.detach(), sin.detach()")
    if len({q.device, k.device, cos.device, sin.device}) > 1:
        raise ValueError("apply_rotary: q, k, cos and sin must be on one device")


def _writable_in_place(t: Tensor, out_dtype: torch.dtype) -> bool:
    """The kernel can write its result over ``t``: same dtype, unit last stride, no broadcast (stride-0) dim."""
    no_broadcast = all(stride != 0 or size == 1 for stride, size in zip(t.stride(), t.shape))
    return t.dtype == out_dtype and t.stride(-1) == 1 and no_broadcast


class _RopeInPlaceFunction(torch.autograd.Function):
    """Rotates q and k where they are, and the incoming gradients where they are in backward.

    Not ``mark_dirty``: that refuses leaves (the kernels suite's inputs) and views of them. Instead the
    version counters of q and k are bumped, so a graph that saved the unrotated q or k for its own
    backward fails there with autograd's "modified by an inplace operation" instead of using rotated
    values. The outputs alias q and k (autograd returns an unmodified-looking input as a view with
    this Function's gradient), so a leaf's gradient is the true one."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor):
        cos_rows, sin_rows = _cos_sin_rows(cos, sin)
        launch_rope(q, k, cos_rows, sin_rows, q, k)
        increment_version((q, k))
        ctx.save_for_backward(cos, sin)
        return q, k

    @staticmethod
    def backward(ctx, dq_rot: Tensor, dk_rot: Tensor):
        cos, sin = ctx.saved_tensors
        if _writable_in_place(dq_rot, dq_rot.dtype) and _writable_in_place(dk_rot, dk_rot.dtype):
            launch_rope(dq_rot, dk_rot, *_cos_sin_rows(cos, sin), dq_rot, dk_rot, backward=True)
            return dq_rot, dk_rot, None, None
        dq, dk = _rope_bwd(dq_rot, dk_rot, cos, sin, dq_rot.dtype, dk_rot.dtype)
        return dq, dk, None, None


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, inplace: bool = False) -> tuple[Tensor, Tensor]:
    """``(q*cos + rotate_half(q)*sin, k*cos + rotate_half(k)*sin)``, equal to HF's ``apply_rotary_pos_emb``.

    ``inplace=True`` writes the result over q and k, and in backward the gradients over the incoming ones:
    no output allocation. For callers that never read the unrotated q / k again, as HF's attention modules
    do; one that saved them for its backward gets autograd's in-place error, never wrong gradients. The
    incoming gradients are overwritten, so none may be read elsewhere (hooks, retain_grad). It falls back
    to the out-of-place op where writing over the inputs cannot give the result: under torch.compile (the
    custom op is functional), a q / k whose last stride is not 1, or cos/sin of a wider dtype (the result
    would have that dtype)."""
    _check_rope_inputs(q, k, cos, sin)
    if not inplace or torch.compiler.is_compiling():
        return _rope_op(q, k, cos, sin)
    if q.numel() and q.data_ptr() == k.data_ptr():
        raise ValueError("apply_rotary(inplace=True): q and k share memory; rotating one would rotate the other twice")
    out_q, out_k = torch.promote_types(q.dtype, cos.dtype), torch.promote_types(k.dtype, cos.dtype)
    if not (_writable_in_place(q, out_q) and _writable_in_place(k, out_k)):
        return _rope_op(q, k, cos, sin)
    return _RopeInPlaceFunction.apply(q, k, cos, sin)
