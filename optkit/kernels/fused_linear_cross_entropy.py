"""Linear layer + cross-entropy (the LM head and its loss) without materializing the logits.

What is fused: ``cross_entropy(hidden @ weight.T + bias, target)`` with the gradients of hidden,
weight and bias, chunked over tokens so that only one (rows, V) block of logits exists at a time.
Per chunk: cuBLAS computes the chunk's logits in the weights' dtype into one reused buffer; the
cross-entropy kernel of ``optkit.kernels.cross_entropy`` writes the loss and d loss / d logits over
them in place; then ``grad_hidden[chunk] = dlogits @ weight`` and ``grad_weight += dlogits.T @
hidden[chunk]`` (cuBLAS, fp32 accumulation inside each GEMM) and ``grad_bias += dlogits.sum(0)``.
The three GEMMs are the same 3 x 2·N·H·V FLOPs as eager's matmul forward + backward; what is saved is
the (N, V) logits, their fp32/bf16 copies and the softmax of eager's CE.

Gradients are computed in forward, so backward only multiplies them by grad_output (in place, skipped
on the device when it is 1): timers see the gradient work as forward time; compare on forward +
backward. reduction="none" is the exception: per-token grad_outputs must weigh the logits' gradient
before it is summed into grad_weight, so forward computes only the loss and backward recomputes every
chunk (one extra matmul, 4 GEMMs in all).

Chunk size: ``rows = LOGITS_CHUNK_BYTES // (V * itemsize)``, balanced over the chunks (override with
``chunk_rows``). The weight-gradient GEMM reads and writes all of grad_weight once per chunk, so its
arithmetic intensity is ~rows/2 FLOP per byte of grad_weight traffic: an H100 (989 TFLOP/s over
3.35 TB/s, ~300 FLOP/B) needs rows in the high hundreds to stay compute-bound. 256 MiB gives 1024
rows at V=128256 in bf16 (8 chunks for 8192 tokens). Liger-Kernel budgets tokens x hidden elements
instead (256 rows, 64 MiB here): less memory, 4x the grad_weight traffic.

Memory (beyond the inputs): grad_hidden (N x H) and grad_weight (V x H) in the parameters' dtype,
held from forward to backward (they are the results); one chunk of logits (rows x V); N fp32 losses;
a V-long fp32 bias-gradient accumulator. Never anything of size N x V. A frozen weight
(requires_grad False) skips its GEMM and buffer.

Accumulation: grad_weight is summed over chunks in the weight's dtype (cuBLAS addmm: fp32 inside a
GEMM, one rounding per chunk), so its error grows like sqrt(chunks) roundings; an fp32 accumulator
would double the largest buffer here. grad_bias accumulates in fp32.

Limits: hidden (..., H), weight (V, H) and bias (V,) share one floating dtype (under torch.autocast
they are cast to the autocast dtype first, like nn.Linear); loss in fp32; "mean" over zero non-ignored
tokens is 0 with zero gradients.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from optkit.kernels._launch import check_float_dtype
from optkit.kernels.cross_entropy import (
    check_loss_options,
    launch_cross_entropy_kernel,
    reference_cross_entropy,
    scale_grad_in_place,
)

# Bytes of logits one chunk may hold; see "Chunk size" in the module doc.
LOGITS_CHUNK_BYTES = 256 * 2**20


def reference_fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Plain PyTorch: the full logits, then ``reference_cross_entropy`` (what the tests trust in float64)."""
    logits = nn.functional.linear(hidden, weight, bias)
    return reference_cross_entropy(logits, target, ignore_index, reduction, softcap, label_smoothing)


def chunk_rows_for(n_tokens: int, vocab: int, itemsize: int, budget_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """Rows per chunk: as many as ``budget_bytes`` of logits hold, evened out over the chunks."""
    rows = max(1, budget_bytes // max(1, vocab * itemsize))
    n_chunks = max(1, -(-n_tokens // rows))
    return max(1, -(-n_tokens // n_chunks))


def _flce_fwd(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    softcap: Optional[float],
    label_smoothing: float,
    chunk_rows: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    row_scale: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad_hidden, grad_weight, grad_bias)``; a gradient not asked for is an empty tensor.
    Gradients are computed for "mean"/"sum", and for "none" only with ``row_scale`` (backward's
    per-token grad_output); otherwise the loss alone."""
    hidden_rows, target_rows = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    (n_tokens, _), vocab = hidden_rows.shape, weight.shape[0]
    computes_grads = reduction != "none" or row_scale is not None
    need_grad_hidden, need_grad_weight = need_grad_hidden and computes_grads, need_grad_weight and computes_grads
    need_grad_bias = need_grad_bias and computes_grads and bias is not None
    writes_dlogits = need_grad_hidden or need_grad_weight or need_grad_bias

    loss_rows = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty(hidden.shape if need_grad_hidden else (0,), dtype=hidden.dtype, device=hidden.device)
    grad_weight = torch.empty(weight.shape if need_grad_weight else (0,), dtype=weight.dtype, device=weight.device)
    grad_bias_fp32 = torch.zeros(vocab if need_grad_bias else 0, dtype=torch.float32, device=weight.device)
    grad_hidden_rows = grad_hidden.view(-1, hidden.shape[-1]) if need_grad_hidden else grad_hidden
    n_valid = (target_rows != ignore_index).sum() if reduction == "mean" else None
    token_scale = row_scale.reshape(-1) if row_scale is not None else None
    logits_buffer = torch.empty((min(chunk_rows, n_tokens), vocab), dtype=hidden.dtype, device=hidden.device)

    # out= GEMMs are not autocast; inputs were already cast by the public function.
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, n_tokens, chunk_rows):
            end = min(start + chunk_rows, n_tokens)
            hidden_chunk, logits = hidden_rows[start:end], logits_buffer[: end - start]
            if bias is None:
                torch.mm(hidden_chunk, weight.t(), out=logits)
            else:
                torch.addmm(bias, hidden_chunk, weight.t(), out=logits)
            launch_cross_entropy_kernel(
                logits,
                target_rows[start:end],
                loss_rows[start:end],
                logits if writes_dlogits else None,
                ignore_index,
                softcap,
                label_smoothing,
                n_valid,
                token_scale[start:end] if token_scale is not None else None,
            )
            if need_grad_hidden:
                torch.mm(logits, weight, out=grad_hidden_rows[start:end])
            if need_grad_weight and start == 0:
                torch.mm(logits.t(), hidden_chunk, out=grad_weight)  # the first chunk initializes it
            elif need_grad_weight:
                grad_weight.addmm_(logits.t(), hidden_chunk)
            if need_grad_bias:
                grad_bias_fp32 += logits.sum(dim=0, dtype=torch.float32)
    if need_grad_weight and n_tokens == 0:
        grad_weight.zero_()
    loss = loss_rows.view(target.shape) if reduction == "none" else loss_rows.sum()
    grad_bias = grad_bias_fp32.to(bias.dtype) if need_grad_bias else grad_bias_fp32.to(weight.dtype)
    return loss, grad_hidden, grad_weight, grad_bias


# The same function as an opaque op for torch.compile (the eager path calls _flce_fwd directly). By hand,
# not through _dispatch.autograd_op: there is no backward op; backward scales the forward's gradients in
# place or, for reduction="none", recomputes the chunks through this same op.
_flce_op = torch.library.custom_op("optkit::fused_linear_cross_entropy", mutates_args=())(_flce_fwd)


@_flce_op.register_fake
def _(
    hidden,
    weight,
    target,
    bias,
    ignore_index,
    reduction,
    softcap,
    label_smoothing,
    chunk_rows,
    need_grad_hidden,
    need_grad_weight,
    need_grad_bias,
    row_scale,
):
    grads = reduction != "none" or row_scale is not None
    loss = hidden.new_empty(target.shape if reduction == "none" else (), dtype=torch.float32)
    grad_hidden = hidden.new_empty(hidden.shape if need_grad_hidden and grads else (0,))
    grad_weight = weight.new_empty(weight.shape if need_grad_weight and grads else (0,))
    if need_grad_bias and grads and bias is not None:
        grad_bias = bias.new_empty(bias.shape)
    else:
        grad_bias = weight.new_empty(0)
    return loss, grad_hidden, grad_weight, grad_bias


def _flce_setup_context(ctx, inputs, output) -> None:
    hidden, weight, target, bias, *options = inputs
    ctx.options = tuple(options[:5])  # ignore_index, reduction, softcap, label_smoothing, chunk_rows
    ctx.needs = tuple(options[5:8])  # grad of hidden, weight, bias
    if ctx.options[1] == "none":  # backward recomputes the chunks with the per-token grad_output
        ctx.save_for_backward(hidden, weight, target, bias)
    else:
        ctx.save_for_backward(*output[1:])


def _flce_backward_with(recompute, scale_in_place, ctx, grad_loss: Tensor):
    if ctx.options[1] == "none":
        hidden, weight, target, bias = ctx.saved_tensors
        _, *grads = recompute(hidden, weight, target, bias, *ctx.options, *ctx.needs, grad_loss)
    else:
        grads = ctx.saved_tensors
        for grad, needed in zip(grads, ctx.needs):
            if needed and grad.numel():
                scale_in_place(grad, grad_loss)
    grad_hidden, grad_weight, grad_bias = (g if needed and g.numel() else None for g, needed in zip(grads, ctx.needs))
    return (grad_hidden, grad_weight, None, grad_bias) + (None,) * 9


def _scale_in_place_eager(grad: Tensor, grad_loss: Tensor) -> None:
    scale_grad_in_place(grad, grad_loss)
    torch.autograd.graph.increment_version(grad)  # a second backward through this graph now raises


_flce_op.register_autograd(
    lambda ctx, grad_loss, *_: _flce_backward_with(
        _flce_op, torch.ops.optkit.cross_entropy_scale_grad_, ctx, grad_loss
    ),
    setup_context=_flce_setup_context,
)


class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """The eager path: the same chunk loop without a custom op's dispatch cost."""

    @staticmethod
    def forward(ctx, *args):
        output = _flce_fwd(*args)
        _flce_setup_context(ctx, args, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss):
        return _flce_backward_with(_flce_fwd, _scale_in_place_eager, ctx, grad_loss)


def _autocast_to(dtype_source: Tensor, *tensors: Optional[Tensor]):
    device_type = dtype_source.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t if t is None else t.to(dtype) for t in tensors)


def _check_args(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor]) -> None:
    check_float_dtype("fused_linear_cross_entropy", hidden=hidden, weight=weight)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"fused_linear_cross_entropy: weight {tuple(weight.shape)} must be (V, H) with H = hidden's last dim "
            f"{hidden.shape[-1]}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"fused_linear_cross_entropy: bias {tuple(bias.shape)} must be ({weight.shape[0]},)")
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) > 1:
        raise TypeError(
            f"fused_linear_cross_entropy: hidden, weight and bias have dtypes {sorted(map(str, dtypes))}; "
            "cast them to one dtype or run under torch.autocast"
        )
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"fused_linear_cross_entropy: target shape {tuple(target.shape)} must be hidden's without the "
            f"last dim, {tuple(hidden.shape[:-1])}"
        )
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"fused_linear_cross_entropy: target must be int64 or int32, got {target.dtype}")
    devices = {t.device for t in (hidden, weight, target, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(
            f"fused_linear_cross_entropy: inputs are on {sorted(map(str, devices))}; move them to one device"
        )


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: Optional[float] = None,
    label_smoothing: float = 0.0,
    *,
    chunk_rows: Optional[int] = None,
) -> Tensor:
    """``cross_entropy(hidden @ weight.T + bias, target)`` chunked over tokens; see the module doc.

    Gradients are computed in forward (for "mean"/"sum"); backward only scales them by grad_output.
    ``chunk_rows`` overrides the rows per chunk (default: ``LOGITS_CHUNK_BYTES`` of logits).
    """
    hidden, weight, bias = _autocast_to(hidden, hidden, weight, bias)
    _check_args(hidden, weight, target, bias)
    check_loss_options(reduction, softcap, label_smoothing)
    n_tokens = target.numel()
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(n_tokens, weight.shape[0], weight.element_size())
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be at least 1")
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    args = (
        hidden,
        weight,
        target,
        bias,
        int(ignore_index),
        reduction,
        None if softcap is None else float(softcap),
        float(label_smoothing),
        int(chunk_rows),
        *needs,
        None,
    )
    if torch.compiler.is_compiling():  # the custom op is opaque to the graph: no break, our kernels run
        return _flce_op(*args)[0]
    if not any(needs):
        return _flce_fwd(*args)[0]
    return _FusedLinearCrossEntropyFunction.apply(*args)


class FusedLinearCrossEntropyLoss(nn.Module):
    """Loss module taking the LM head's input: ``forward(hidden, weight, target, bias=None)``."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        softcap: Optional[float] = None,
        label_smoothing: float = 0.0,
        chunk_rows: Optional[int] = None,
    ):
        super().__init__()
        check_loss_options(reduction, softcap, label_smoothing)
        self.ignore_index, self.reduction, self.softcap = ignore_index, reduction, softcap
        self.label_smoothing, self.chunk_rows = label_smoothing, chunk_rows

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return fused_linear_cross_entropy(
            hidden,
            weight,
            target,
            bias,
            self.ignore_index,
            self.reduction,
            self.softcap,
            self.label_smoothing,
            chunk_rows=self.chunk_rows,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction}, softcap={self.softcap}, "
            f"label_smoothing={self.label_smoothing}, chunk_rows={self.chunk_rows}"
        )
