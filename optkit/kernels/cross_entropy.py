"""Cross-entropy over large vocabularies, forward and backward, as one Triton kernel per row.

What is fused: eager PyTorch runs CE on bf16 logits as log_softmax (read V, write V) and nll in
forward, then nll_backward (write V) and log_softmax_backward (read 2V, write V) in backward; callers
that upcast first add an fp32 copy of the logits. Here one program per row reads its logits in
chunks of BLOCK for an online (max, sum of exp) in fp32, then reads them again -- in reverse chunk
order, so the chunks read last are the likeliest to still be in L2 -- and writes the gradient of the
loss right away: ``softmax - (1 - eps) * onehot - eps / V``, times softcap's chain rule, times
1 / n_valid for "mean". Forward + backward move ~1 read + 1 write of the logits through HBM, with no
fp32 copy and no host sync (the count of non-ignored tokens stays on the device).

Where the gradient goes, and what that costs in memory:
- default: a fresh buffer in the logits' dtype, written in forward and held until backward, so the
  logits and their gradient coexist (2x the logits). Always safe.
- ``overwrite_logits=True``: into the logits' own buffer (Liger's trick), 1x the logits. Only for
  callers that never read the logits afterwards (a training loss whose logits are not returned). The
  logits' version counter is bumped, so when another op saved them for its backward autograd raises
  instead of silently using gradients as logits. A leaf tensor, and any call under torch.compile (a
  custom op may not mutate its differentiable input), gets the fresh buffer instead.
Backward multiplies that gradient by grad_output in place, with a kernel that reads grad_output on the
device and returns at once where it is 1 (``loss.backward()``): one tiny launch and no sync. Because
the gradient is computed in forward, timers see the gradient work as forward time: compare this op on
forward + backward. Backward through one graph twice raises (the gradient was scaled in place).

Semantics are torch.nn.functional.cross_entropy's with the class dim last, except: the loss is fp32
for every logits dtype (a bf16 loss would round 11.76 to 11.75); "mean" over zero non-ignored tokens
is 0 with a zero gradient (torch gives NaN). Targets must lie in [0, V) or equal ignore_index (checked
only in Triton debug mode). Logits are fp32/fp16/bf16 of shape (..., V) read in place through two
levels of leading strides (slices such as ``logits[:, :-1]`` are not copied); leading dims that merge
into no view, or a last dim that is not unit-stride, are copied once. In fp16 the gradient is rounded
after the 1/n_valid of "mean" but before backward's grad_output, so a GradScaler's factor cannot
rescue probabilities below ~6e-8 * n_valid from underflow (eager PyTorch rounds after both); bf16
and fp32 have no such limit.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from optkit.kernels._launch import check_float_dtype, flat_tile_config, persistent_programs

REDUCTIONS = ("mean", "sum", "none")

# Logits per chunk a program holds at once. 16384 over 32 warps is 16 fp32 per thread: 64 registers
# and no spills on sm_90 (Triton 3.9 spills 200 B per thread at 32768, Liger's setting). A program of
# 1024 threads x 64 registers fills an SM, so ~132 rows are in flight on an H100 (~34 MB of bf16 at
# V=128256) and the second read of each row is served from the 50 MB L2; its 32 KB of loads per chunk
# cover what Little's law asks of one SM (~18 KB at 3.35 TB/s and ~700 ns). Tests lower it.
_MAX_BLOCK = 16384


def reference_cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Plain PyTorch in the logits' dtype (what the tests trust in float64); the loss comes back in
    ``promote_types(logits.dtype, float32)``, like the kernel's, and is 0 when every token is ignored."""
    x = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(x, dim=-1)
    valid = target != ignore_index
    nll = -logp.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    per_token = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(dim=-1)
    per_token = torch.where(valid, per_token, 0.0).to(torch.promote_types(logits.dtype, torch.float32))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum().clamp(min=1)


@triton.jit
def _tanh(x):
    # Through exp so one code path serves every Triton version and the interpreter; saturates to +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


# Reads the row twice (the second time mostly from L2) and its target; writes 4 bytes of loss and, with
# COMPUTE_GRAD, the row's gradient (V elements, may be the logits' own memory). Ignored rows read
# nothing and write zeros.
@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,
    target_ptr,
    loss_ptr,
    grad_ptr,
    n_valid_ptr,
    row_scale_ptr,
    n_cols,
    rows_per_batch,
    stride_logits_b,
    stride_logits_t,
    stride_grad_b,
    stride_grad_t,
    stride_row_scale,
    ignore_index,
    softcap,
    label_smoothing,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    MEAN: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 elements on large batches
    batch, pos = row // rows_per_batch, row % rows_per_batch
    logits_row = logits_ptr + batch * stride_logits_b + pos * stride_logits_t
    grad_row = grad_ptr + batch * stride_grad_b + pos * stride_grad_t
    offsets = tl.arange(0, BLOCK)
    n_blocks = (n_cols + BLOCK - 1) // BLOCK  # not tl.cdiv: a jit call costs ~10 ms under the interpreter
    target = tl.load(target_ptr + row).to(tl.int64)

    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for block in range(n_blocks):
                cols = block * BLOCK + offsets
                tl.store(grad_row + cols, tl.zeros([BLOCK], grad_ptr.dtype.element_ty), mask=cols < n_cols)
        return
    tl.device_assert((target >= 0) & (target < n_cols), "cross_entropy: target outside [0, V)")
    target = target.to(tl.int32)  # < V: 32-bit compares against the column indices below

    # Pass 1: running max m and sum d of exp(x - m) over chunks, in fp32.
    m = float("-inf")
    d = 0.0
    x_sum = 0.0
    for block in range(n_blocks):
        cols = block * BLOCK + offsets
        mask = cols < n_cols
        x = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        if HAS_SMOOTHING:
            x_sum += tl.sum(x, axis=0)  # masked lanes hold softcap(0) = 0
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all -inf prefix must not make NaN
        d = d * tl.exp(m - m_shift) + tl.sum(tl.exp(x - m_shift), axis=0)
        m = m_new
    lse = m + tl.log(d)

    x_target = tl.load(logits_row + target).to(tl.float32)
    if HAS_SOFTCAP:
        x_target = softcap * _tanh(x_target / softcap)
    loss = lse - (1.0 - label_smoothing) * x_target
    if HAS_SMOOTHING:
        loss -= label_smoothing * x_sum / n_cols
    scale = 1.0
    if MEAN:
        scale = 1.0 / tl.maximum(tl.load(n_valid_ptr).to(tl.float32), 1.0)
    tl.store(loss_ptr + row, loss * scale)

    # Pass 2, last chunk first: d loss / d logits, written over the chunk just read when in place.
    if COMPUTE_GRAD:
        if HAS_ROW_SCALE:
            scale *= tl.load(row_scale_ptr + row * stride_row_scale).to(tl.float32)
        for i in range(n_blocks):
            cols = (n_blocks - 1 - i) * BLOCK + offsets
            mask = cols < n_cols
            x = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                capped = _tanh(x / softcap)
                x = softcap * capped
            grad = tl.exp(x - lse)
            if HAS_SMOOTHING:
                grad -= label_smoothing / n_cols
            grad = tl.where(cols == target, grad - (1.0 - label_smoothing), grad)
            if HAS_SOFTCAP:
                grad *= 1.0 - capped * capped
            tl.store(grad_row + cols, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


# Reads one scale and, unless it is exactly 1, the whole tensor; writes it scaled in place. A persistent
# grid: the common grad_output == 1 case is one wave of programs that read one number and return.
@triton.jit
def _scale_rows_kernel(
    x_ptr,
    scale_ptr,
    n_cols,
    rows_per_batch,
    n_col_blocks,
    n_blocks,
    stride_x_b,
    stride_x_t,
    stride_scale,
    ONE_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if ONE_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
        if scale == 1.0:
            return
    for block_id in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        row, col_block = block_id // n_col_blocks, block_id % n_col_blocks
        if not ONE_SCALE:
            scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
        if scale != 1.0:
            row64 = row.to(tl.int64)
            cols = col_block * BLOCK + tl.arange(0, BLOCK)
            mask = cols < n_cols
            ptrs = x_ptr + (row64 // rows_per_batch) * stride_x_b + (row64 % rows_per_batch) * stride_x_t + cols
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptrs, (x * scale).to(x_ptr.dtype.element_ty), mask=mask)


def _check_can_launch(x: Tensor) -> None:
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "optkit's cross-entropy kernels are Triton kernels: on CPU set TRITON_INTERPRET=1 before "
            "triton is imported (tests/conftest.py does), or use reference_cross_entropy"
        )


def _batched_rows(x: Tensor, allow_copy: bool = True) -> Tuple[Tensor, int, int, int]:
    """``(x, rows_per_batch, stride_b, stride_t)``: row r of x's last dim starts at
    ``(r // rows_per_batch) * stride_b + (r % rows_per_batch) * stride_t``. Two levels of strides read
    (B, T, V) slices in place; deeper leading dims are merged into B (a copy only if they can't be)."""
    if x.dim() > 3:
        try:
            x = x.view(-1, *x.shape[-2:])
        except RuntimeError:
            if not allow_copy:
                raise
            x = x.reshape(-1, *x.shape[-2:])
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        if not allow_copy:
            raise RuntimeError("internal: an in-place kernel needs a unit last stride")
        x = x.contiguous()
    if x.dim() == 1:
        return x, 1, 0, 0
    if x.dim() == 2:
        return x, max(x.shape[0], 1), 0, x.stride(0)
    return x, max(x.shape[1], 1), x.stride(0), x.stride(1)


def _reads_in_place(x: Tensor) -> bool:
    """Whether the kernels can address x's own memory (else it is copied once)."""
    try:
        _batched_rows(x, allow_copy=False)
        return True
    except RuntimeError:
        return False


def _block_and_warps(n_cols: int) -> Tuple[int, int]:
    block = min(_MAX_BLOCK, triton.next_power_of_2(max(n_cols, 1)))
    return block, max(4, min(32, block // 512))  # up to 16 fp32 per thread, 4..32 warps


def launch_cross_entropy_kernel(
    logits: Tensor,
    target: Tensor,
    loss_rows: Tensor,
    grad: Optional[Tensor],
    ignore_index: int,
    softcap: Optional[float],
    label_smoothing: float,
    n_valid: Optional[Tensor] = None,
    row_scale: Optional[Tensor] = None,
) -> None:
    """One row per program over ``logits`` (..., V): the loss of each row into ``loss_rows`` (fp32,
    one per row, divided by ``n_valid`` when given), and the gradient into ``grad`` (logits' shape,
    unit last stride; may be ``logits`` itself), times ``n_valid``'s and ``row_scale[row]``'s factors.
    ``grad=None`` computes the loss only (one read of the logits)."""
    _check_can_launch(logits)
    n_rows, n_cols = loss_rows.numel(), logits.shape[-1]
    if n_rows == 0:
        return
    logits_rows, rows_per_batch, stride_lb, stride_lt = _batched_rows(logits, allow_copy=False)
    grad_rows, _, stride_gb, stride_gt = (
        _batched_rows(grad, allow_copy=False) if grad is not None else (logits_rows, 0, 0, 0)
    )
    block, num_warps = _block_and_warps(n_cols)
    _cross_entropy_fwd_kernel[(n_rows,)](
        logits_rows,
        target,
        loss_rows,
        grad_rows,
        n_valid if n_valid is not None else target,
        row_scale if row_scale is not None else loss_rows,
        n_cols,
        rows_per_batch,
        stride_lb,
        stride_lt,
        stride_gb,
        stride_gt,
        row_scale.stride(0) if row_scale is not None else 0,
        ignore_index,
        0.0 if softcap is None else softcap,
        label_smoothing,
        HAS_SOFTCAP=softcap is not None,
        HAS_SMOOTHING=label_smoothing > 0.0,
        MEAN=n_valid is not None,
        HAS_ROW_SCALE=row_scale is not None,
        COMPUTE_GRAD=grad is not None,
        BLOCK=block,
        num_warps=num_warps,
    )


def scale_grad_in_place(grad: Tensor, grad_output: Tensor) -> None:
    """``grad *= grad_output`` in place, skipped on the device where the factor is 1. ``grad_output`` is
    one number, or one per row of ``grad``'s last dim (shape ``grad.shape[:-1]``)."""
    if grad.numel() == 0:
        return
    _check_can_launch(grad)
    rows, rows_per_batch, stride_b, stride_t = _batched_rows(grad, allow_copy=False)
    n_cols = grad.shape[-1]
    n_rows = grad.numel() // n_cols
    factors = grad_output.reshape(-1)
    if factors.numel() not in (1, n_rows):
        raise ValueError(
            f"grad_output of shape {tuple(grad_output.shape)} does not scale a gradient of shape {tuple(grad.shape)}"
        )
    block, num_warps = flat_tile_config(n_cols)
    n_col_blocks = triton.cdiv(n_cols, block)
    n_blocks = n_rows * n_col_blocks
    _scale_rows_kernel[(persistent_programs(grad.device, n_blocks),)](
        rows,
        factors,
        n_cols,
        rows_per_batch,
        n_col_blocks,
        n_blocks,
        stride_b,
        stride_t,
        factors.stride(0),
        ONE_SCALE=factors.numel() == 1,
        BLOCK=block,
        num_warps=num_warps,
    )


def _cross_entropy_fwd(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    reduction: str,
    softcap: Optional[float],
    label_smoothing: float,
    grad_into: str,
) -> Tuple[Tensor, Tensor]:
    """``(loss, grad)``. ``grad_into``: "none" (loss only; grad is empty), "new" (a fresh buffer) or
    "logits" (the logits' own memory; a copy of them if their layout needed one)."""
    if not _reads_in_place(logits):
        logits = logits.contiguous()
    target_rows = target.reshape(-1)
    loss_rows = torch.empty(target_rows.shape, dtype=torch.float32, device=logits.device)
    if grad_into == "none":
        grad = logits.new_empty(0)
    elif grad_into == "new":
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    else:
        grad = logits
    n_valid = (target_rows != ignore_index).sum() if reduction == "mean" else None
    launch_cross_entropy_kernel(
        logits,
        target_rows,
        loss_rows,
        None if grad_into == "none" else grad,
        ignore_index,
        softcap,
        label_smoothing,
        n_valid,
    )
    loss = loss_rows.view(target.shape) if reduction == "none" else loss_rows.sum()
    return loss, grad


# Registered by hand, not through _dispatch.autograd_op: the gradient is computed in forward and backward
# scales it in place (a mutating op, not a backward op), and the eager path has an overwrite_logits mode
# that a custom op may not have (it would mutate its differentiable input).
@torch.library.custom_op("optkit::cross_entropy", mutates_args=())
def _cross_entropy_op(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    reduction: str,
    softcap: Optional[float],
    label_smoothing: float,
    compute_grad: bool,
) -> Tuple[Tensor, Tensor]:
    return _cross_entropy_fwd(
        logits, target, ignore_index, reduction, softcap, label_smoothing, "new" if compute_grad else "none"
    )


@_cross_entropy_op.register_fake
def _(logits, target, ignore_index, reduction, softcap, label_smoothing, compute_grad):
    loss = logits.new_empty(target.shape if reduction == "none" else (), dtype=torch.float32)
    return loss, logits.new_empty(logits.shape if compute_grad else (0,))


@torch.library.custom_op("optkit::cross_entropy_scale_grad_", mutates_args=("grad",))
def _scale_grad_op(grad: Tensor, grad_output: Tensor) -> None:
    scale_grad_in_place(grad, grad_output)


@_scale_grad_op.register_fake
def _(grad, grad_output):
    return None


def _check_grad_was_computed(grad: Tensor) -> None:
    if grad.numel() == 0:  # only reachable by calling the raw op with compute_grad=False
        raise RuntimeError("optkit::cross_entropy ran with compute_grad=False; call it with True to backpropagate")


def _cross_entropy_op_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])


def _cross_entropy_op_backward(ctx, grad_loss: Tensor, _grad_of_grad: Optional[Tensor]):
    (grad,) = ctx.saved_tensors
    _check_grad_was_computed(grad)
    torch.ops.optkit.cross_entropy_scale_grad_(grad, grad_loss)
    return grad, None, None, None, None, None, None


_cross_entropy_op.register_autograd(_cross_entropy_op_backward, setup_context=_cross_entropy_op_setup_context)


class _CrossEntropyFunction(torch.autograd.Function):
    """The eager path: the same launchers without a custom op's dispatch cost, plus ``overwrite_logits``."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, softcap, label_smoothing, overwrite_logits):
        loss, grad = _cross_entropy_fwd(
            logits,
            target,
            ignore_index,
            reduction,
            softcap,
            label_smoothing,
            "logits" if overwrite_logits else "new",
        )
        if grad is logits:  # whoever saved these logits for backward must now fail loudly
            torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors  # raises on a second backward: the version bump below
        scale_grad_in_place(grad, grad_loss)
        torch.autograd.graph.increment_version(grad)
        return grad, None, None, None, None, None, None


def check_loss_options(reduction: str, softcap: Optional[float], label_smoothing: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not valid; choose one of: {', '.join(REDUCTIONS)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap} must be a positive number (Gemma-2 uses 30.0) or None")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 1]")


def _check_args(
    logits: Tensor, target: Tensor, reduction: str, softcap: Optional[float], label_smoothing: float
) -> None:
    check_float_dtype("cross_entropy", logits=logits)
    check_loss_options(reduction, softcap, label_smoothing)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"cross_entropy: logits of shape {tuple(logits.shape)} have no classes; expected (..., V)")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"cross_entropy: target shape {tuple(target.shape)} must be logits' shape without the class dim, "
            f"{tuple(logits.shape[:-1])}"
        )
    if target.dtype not in (torch.int64, torch.int32) or target.device != logits.device:
        raise TypeError(
            f"cross_entropy: target must be int64/int32 on {logits.device}, got {target.dtype} on {target.device}"
        )


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    label_smoothing: float = 0.0,
    *,
    overwrite_logits: bool = False,
) -> Tensor:
    """Cross-entropy of ``logits`` (..., V) against class indices ``target`` (...); see the module doc.

    ``softcap``: Gemma-2's ``cap * tanh(logits / cap)`` before the softmax, differentiated through.
    ``overwrite_logits``: write the gradient into the logits' memory (saves one logits-sized buffer);
    only when nothing reads the logits after this call.
    """
    _check_args(logits, target, reduction, softcap, label_smoothing)
    softcap = None if softcap is None else float(softcap)
    args = (logits, target, int(ignore_index), reduction, softcap, float(label_smoothing))
    needs_grad = logits.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling():  # the custom op is opaque to the graph: no break, our kernels run
        return _cross_entropy_op(*args, needs_grad)[0]
    if not needs_grad:
        return _cross_entropy_fwd(*args, "none")[0]
    return _CrossEntropyFunction.apply(*args, overwrite_logits and logits.grad_fn is not None)


class CrossEntropyLoss(nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` (class dim last, no class weights) on the fused kernel."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        softcap: Optional[float] = None,
        label_smoothing: float = 0.0,
        overwrite_logits: bool = False,
    ):
        super().__init__()
        check_loss_options(reduction, softcap, label_smoothing)
        self.ignore_index, self.reduction, self.softcap = ignore_index, reduction, softcap
        self.label_smoothing, self.overwrite_logits = label_smoothing, overwrite_logits

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            logits,
            target,
            self.ignore_index,
            self.reduction,
            self.softcap,
            self.label_smoothing,
            overwrite_logits=self.overwrite_logits,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction}, softcap={self.softcap}, "
            f"label_smoothing={self.label_smoothing}, overwrite_logits={self.overwrite_logits}"
        )
