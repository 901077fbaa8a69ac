"""optkit.kernels.fused_linear_cross_entropy against its float64 reference, and its memory bound.

Tolerances: tests/kernels/_tolerances.py (relative norm error per dtype, and fused max error <= 2x plain
PyTorch's in the same dtype + 1 ulp at the tensor's own scale) for the loss and the gradients of hidden, weight
and bias.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from optkit.kernels.fused_linear_cross_entropy import (
    FusedLinearCrossEntropyLoss,
    chunk_rows_for,
    fused_linear_cross_entropy,
    reference_fused_linear_cross_entropy,
)
from tests.kernels._tolerances import OPCHECKS, assert_close_to_reference, check_forward_backward

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100


def _inputs(tokens_shape, hidden_size, vocab, dtype, seed, bias=True, ignore_fraction=0.3, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn((*tokens_shape, hidden_size), generator=gen).to(device=device, dtype=dtype)
    # ~N(0, 1) logits: weights scaled by 1/sqrt(H) as an initialized LM head is
    weight = (torch.randn(vocab, hidden_size, generator=gen) * hidden_size**-0.5).to(device=device, dtype=dtype)
    bias_t = (torch.randn(vocab, generator=gen) * 0.5).to(device=device, dtype=dtype) if bias else None
    target = torch.randint(0, vocab, tokens_shape, generator=gen)
    target = target.masked_fill(torch.rand(tokens_shape, generator=gen) < ignore_fraction, IGNORE).to(device)
    return hidden.requires_grad_(), weight.requires_grad_(), bias_t.requires_grad_() if bias else None, target


def _check(hidden, weight, bias, target, dtype, seed=0, **options):
    chunk_rows = options.pop("chunk_rows", None)
    tensors = [hidden, weight] + ([bias] if bias is not None else [])

    def fused(h, w, b=None):
        return fused_linear_cross_entropy(h, w, target, b, chunk_rows=chunk_rows, **options)

    def reference(h, w, b=None):
        return reference_fused_linear_cross_entropy(h, w, target, b, **options)

    check_forward_backward(fused, reference, tensors, dtype, seed)


@settings(max_examples=12, deadline=None)
@given(
    tokens=st.integers(1, 12),
    lead=st.sampled_from([(), (2,)]),
    hidden_size=st.integers(8, 48),
    vocab=st.integers(37, 300),
    chunk_rows=st.integers(1, 7),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    softcap=st.sampled_from([None, 3.0]),
    ignore_fraction=st.sampled_from([0.0, 0.4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_match_reference(
    tokens, lead, hidden_size, vocab, chunk_rows, dtype, bias, reduction, softcap, ignore_fraction, seed
):
    shape = (*lead, tokens)
    hidden, weight, bias_t, target = _inputs(shape, hidden_size, vocab, dtype, seed, bias, ignore_fraction)
    _check(hidden, weight, bias_t, target, dtype, seed, chunk_rows=chunk_rows, reduction=reduction, softcap=softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_smoothing_across_chunks(dtype):
    hidden, weight, bias, target = _inputs((13,), 24, 150, dtype, seed=1)
    _check(hidden, weight, bias, target, dtype, chunk_rows=4, label_smoothing=0.1, softcap=5.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, 1e-20], ids=["zero_rows", "tiny_rows"])
def test_flat_hidden_rows(dtype, scale):
    """Every other token's hidden state all zero or at 1e-20 (fp16 holds it as 0): those tokens' logits are
    the bias alone, their share of the weight gradient is ~0 beside the other tokens'."""
    hidden, weight, bias, target = _inputs((14,), 24, 90, dtype, seed=11)
    hidden = hidden.detach()
    hidden[::2] = (hidden[::2].double() * scale).to(dtype)
    _check(hidden.requires_grad_(), weight, bias, target, dtype, chunk_rows=4, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_weight_gets_no_gradient(reduction):
    hidden, weight, bias, target = _inputs((11,), 16, 90, torch.bfloat16, seed=2)
    weight.requires_grad_(False)
    _check(hidden, weight, bias, target, torch.bfloat16, chunk_rows=5, reduction=reduction)
    fused_linear_cross_entropy(hidden, weight, target, bias, reduction=reduction, chunk_rows=5).sum().backward()
    assert weight.grad is None and hidden.grad is not None and bias.grad is not None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tokens", [0, 7])
def test_all_ignored_or_empty_gives_zero_loss_and_grads(reduction, tokens):
    hidden, weight, bias, _ = _inputs((tokens,), 16, 60, torch.float32, seed=3)
    target = torch.full((tokens,), IGNORE)
    loss = fused_linear_cross_entropy(hidden, weight, target, bias, reduction=reduction, chunk_rows=3)
    grads = torch.autograd.grad(loss.sum(), [hidden, weight, bias], allow_unused=True)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all() and (loss == 0).all()
    for grad, param in zip(grads, (hidden, weight, bias)):
        assert grad is None or (grad.shape == param.shape and (grad == 0).all())


def test_backward_from_loss_alone_and_twice_raises():
    hidden, weight, bias, target = _inputs((9,), 16, 70, torch.float32, seed=4)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    reference_fused_linear_cross_entropy(h64, w64, target, b64).backward()
    loss = fused_linear_cross_entropy(hidden, weight, target, bias, chunk_rows=4)
    loss.backward(retain_graph=True)  # grad_output 1: the scaling kernel returns at once
    for ours, expected in ((hidden, h64), (weight, w64), (bias, b64)):
        torch.testing.assert_close(ours.grad, expected.grad.float())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_autocast_casts_like_linear():
    hidden, weight, bias, target = _inputs((10,), 32, 80, torch.float32, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, target, bias, chunk_rows=4)
    loss.backward()
    h16, w16, b16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight, bias))
    expected = fused_linear_cross_entropy(h16, w16, target, b16, chunk_rows=4)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for ours, bf16 in ((hidden, h16), (weight, w16), (bias, b16)):
        assert ours.grad.dtype == torch.float32
        torch.testing.assert_close(ours.grad, bf16.grad.float())


class _AllocationCounter(TorchDispatchMode):
    """Bytes of every tensor the ops under it create (outputs sharing no storage with the op's inputs).

    CPU allocations can't be read from an allocator, so this counts them: the sum over all creations
    is an upper bound on the peak of what the implementation allocates."""

    def __init__(self):
        super().__init__()
        self.total_bytes = 0
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                size = t.untyped_storage().nbytes()
                self.total_bytes += size
                self.largest_bytes = max(self.largest_bytes, size)
        return out


def test_memory_is_one_chunk_of_logits_not_all_of_them():
    tokens, hidden_size, vocab, chunk_rows = 96, 16, 400, 12
    hidden, weight, bias, target = _inputs((tokens,), hidden_size, vocab, torch.float32, seed=6)
    with _AllocationCounter() as counter:
        fused_linear_cross_entropy(hidden, weight, target, bias, chunk_rows=chunk_rows).backward()
    itemsize = 4
    chunk_bytes = chunk_rows * vocab * itemsize
    results_bytes = (tokens * hidden_size + vocab * hidden_size + vocab) * itemsize  # the three gradients
    small_bytes = tokens * 8 + (tokens // chunk_rows + 2) * vocab * 4 + 4096  # losses, mask, bias partials
    assert counter.largest_bytes <= max(chunk_bytes, vocab * hidden_size * itemsize)
    assert counter.total_bytes <= results_bytes + chunk_bytes + small_bytes
    assert counter.total_bytes - results_bytes < tokens * vocab * itemsize / 4  # the logits alone are 8 chunks


def test_chunk_rows_from_the_memory_budget():
    assert chunk_rows_for(8192, 128256, 2) == 1024  # 256 MiB of bf16 logits: 8 chunks
    assert chunk_rows_for(5000, 128256, 2) == 1000  # 5 even chunks rather than 4 full and a stub
    assert chunk_rows_for(100, 128256, 2) == 100
    assert chunk_rows_for(0, 128256, 2) == 1
    assert chunk_rows_for(4096, 256000, 4) == 256


def test_module_matches_function():
    hidden, weight, bias, target = _inputs((6,), 16, 50, torch.float32, seed=7)
    module = FusedLinearCrossEntropyLoss(reduction="sum", softcap=4.0, chunk_rows=4)
    expected = fused_linear_cross_entropy(hidden, weight, target, bias, reduction="sum", softcap=4.0, chunk_rows=4)
    torch.testing.assert_close(module(hidden, weight, target, bias), expected, rtol=0, atol=0)
    assert "chunk_rows=4" in repr(module)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"reduction": "avg"}, ValueError, "choose one of"),
        ({"weight": torch.zeros(50, 8)}, ValueError, r"must be \(V, H\)"),
        ({"bias": torch.zeros(49)}, ValueError, r"must be \(50,\)"),
        ({"weight": torch.zeros(50, 16, dtype=torch.bfloat16)}, TypeError, "one dtype"),
        ({"target": torch.zeros(5, dtype=torch.long)}, ValueError, "without the last dim"),
        ({"chunk_rows": 0}, ValueError, "at least 1"),
    ],
)
def test_invalid_arguments_say_what_to_do(change, error, match):
    args = {"hidden": torch.zeros(6, 16), "weight": torch.zeros(50, 16), "target": torch.zeros(6, dtype=torch.long)}
    args["bias"] = torch.zeros(50)
    args.update(change)
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(**args)


def test_custom_op_passes_opcheck():
    """Schema, fake (meta) shapes/strides and autograd registration of the op torch.compile sees."""
    hidden, weight, bias, target = _inputs((2, 3), 16, 40, torch.float32, seed=8)
    for reduction, use_bias, row_scale in [("mean", True, None), ("none", False, torch.rand(2, 3))]:
        options = (IGNORE, reduction, 3.0, 0.0, 4, True, True, use_bias, row_scale)
        args = (hidden, weight, target, bias if use_bias else None, *options)
        torch.library.opcheck(torch.ops.optkit.fused_linear_cross_entropy.default, args, test_utils=OPCHECKS)


def _compile_case(
    backend, device, tokens_shape=(2, 7), hidden_size=32, vocab=200, dtype=torch.float32, reduction="mean"
):
    hidden, weight, bias, target = _inputs(tokens_shape, hidden_size, vocab, dtype, seed=9, device=device)

    def fn(h, w, b):
        loss = fused_linear_cross_entropy(h * 1.0, w, target, b, reduction=reduction, softcap=10.0, chunk_rows=5)
        return loss.sum() * 0.5

    eager_loss = fn(hidden, weight, bias)
    eager_grads = torch.autograd.grad(eager_loss, [hidden, weight, bias])
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=recording_backend, fullgraph=True)
    loss = compiled(hidden, weight, bias)
    grads = torch.autograd.grad(loss, [hidden, weight, bias])
    assert len(graphs) == 1 and "optkit.fused_linear_cross_entropy" in graphs[0]
    torch.testing.assert_close(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiles_without_graph_break(reduction):
    _compile_case("aot_eager", "cpu", reduction=reduction)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiles_with_inductor_on_gpu(reduction):
    _compile_case("inductor", "cuda", (4, 512), 1024, 32000, torch.bfloat16, reduction)


@pytest.mark.gpu
def test_llama3_head_on_gpu_matches_reference_within_memory_bound():
    """4096 tokens, H=4096 -> V=128256 in bf16: loss and all gradients vs float64, and the peak memory
    beyond the inputs is the gradients plus one chunk of logits, not the (4096, 128256) logits."""
    tokens, hidden_size, vocab = 4096, 4096, 128256
    hidden, weight, _, target = _inputs(
        (tokens,), hidden_size, vocab, torch.bfloat16, seed=10, bias=False, device="cuda"
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start_bytes = torch.cuda.memory_allocated()
    loss = fused_linear_cross_entropy(hidden, weight, target)
    loss.backward()
    torch.cuda.synchronize()
    extra_bytes = torch.cuda.max_memory_allocated() - start_bytes
    chunk_bytes = chunk_rows_for(tokens, vocab, 2) * vocab * 2
    results_bytes = (tokens + vocab) * hidden_size * 2  # grad_hidden + grad_weight
    slack_bytes = 96 * 2**20  # cuBLAS workspace, fp32 losses, allocator rounding
    assert extra_bytes <= results_bytes + chunk_bytes + slack_bytes, f"peak extra {extra_bytes / 2**20:.0f} MiB"
    assert extra_bytes - results_bytes < tokens * vocab * 2 / 3, "as if the full logits were materialized"
    grads = (hidden.grad, weight.grad)
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    loss64 = reference_fused_linear_cross_entropy(h64, w64, target)
    loss64.backward()
    h16, w16 = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    loss16 = reference_fused_linear_cross_entropy(h16, w16, target)
    loss16.backward()
    assert_close_to_reference(loss, loss64, loss16, torch.bfloat16, "loss")
    pairs = zip(("hidden", "weight"), grads, (h64.grad, w64.grad), (h16.grad, w16.grad))
    for name, ours, expected, same_dtype in pairs:
        assert_close_to_reference(ours, expected, same_dtype, torch.bfloat16, f"grad of {name}")
