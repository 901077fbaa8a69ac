"""optkit.kernels.cross_entropy against its float64 reference, and the reference against torch.

Tolerances: tests/kernels/_tolerances.py (relative norm error per dtype, and fused max error <= 2x plain
PyTorch's in the same dtype + 1 ulp at the tensor's own scale), for the loss and the logits' gradient alike.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from optkit.kernels.cross_entropy import CrossEntropyLoss, cross_entropy, reference_cross_entropy
from tests.kernels._tolerances import OPCHECKS, assert_close_to_reference, check_forward_backward

ce_module = importlib.import_module("optkit.kernels.cross_entropy")  # the module (the package binds the function)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100


def _logits(shape, dtype, seed, device="cpu", spread=4.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * spread).to(device=device, dtype=dtype).requires_grad_()


def _targets(shape, vocab, seed, ignore_fraction=0.3, device="cpu"):
    gen = torch.Generator().manual_seed(seed + 1)
    target = torch.randint(0, vocab, shape, generator=gen)
    ignored = torch.rand(shape, generator=gen) < ignore_fraction
    return target.masked_fill(ignored, IGNORE).to(device)


def _check(logits, target, dtype, seed=0, **options):
    check_forward_backward(
        lambda x: cross_entropy(x, target, **options),
        lambda x: reference_cross_entropy(x, target, **options),
        [logits],
        dtype,
        seed,
    )


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 6),
    vocab=st.integers(37, 1000),
    lead=st.sampled_from([(), (2,)]),
    dtype=st.sampled_from(DTYPES),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    softcap=st.sampled_from([None, 15.0]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    ignore_fraction=st.sampled_from([0.0, 0.4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_match_reference(
    rows, vocab, lead, dtype, reduction, softcap, label_smoothing, ignore_fraction, seed
):
    shape = (*lead, rows)
    logits, target = _logits((*shape, vocab), dtype, seed), _targets(shape, vocab, seed, ignore_fraction)
    _check(logits, target, dtype, seed, reduction=reduction, softcap=softcap, label_smoothing=label_smoothing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [200, 999])
def test_rows_span_many_chunks(monkeypatch, dtype, vocab):
    monkeypatch.setattr(ce_module, "_MAX_BLOCK", 64)  # 4 and 16 chunks per row, the last one ragged
    logits, target = _logits((3, vocab), dtype, seed=vocab), _targets((3,), vocab, seed=vocab, ignore_fraction=0.0)
    _check(logits, target, dtype, softcap=10.0, label_smoothing=0.2)


def test_large_vocab_row_at_the_default_block():
    vocab = 40000  # > 32768: two chunks of the production block size, the second ragged
    logits, target = _logits((2, vocab), torch.bfloat16, seed=3), _targets((2,), vocab, seed=3, ignore_fraction=0.0)
    _check(logits, target, torch.bfloat16, softcap=30.0, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_label_smoothing_gradient_term_at_bf16(reduction):
    """Confident predictions (the target's logit 12 above the rest, as a trained head gives): away from the
    target the gradient is then -smoothing / V per class, all of it the smoothing term. With V = 40 the term
    is 16% of the gradient's norm, so the bf16 bar sees a kernel that drops it (checked below on the
    reference gradient without the term)."""
    rows, vocab, smoothing = 64, 40, 0.1
    target = _targets((rows,), vocab, seed=19, ignore_fraction=0.1)
    valid = target != IGNORE
    logits = _logits((rows, vocab), torch.float32, seed=19, spread=1.0).detach()
    logits[valid.nonzero().squeeze(1), target[valid]] += 12.0
    logits = logits.bfloat16().requires_grad_()
    options = {"reduction": reduction, "label_smoothing": smoothing}
    _check(logits, target, torch.bfloat16, **options)

    ref64, same = logits.detach().double().requires_grad_(), logits.detach().clone().requires_grad_()
    reference_cross_entropy(ref64, target, **options).backward()
    reference_cross_entropy(same, target, **options).backward()
    count = valid.sum() if reduction == "mean" else 1
    without_term = ref64.grad + smoothing / vocab * valid[:, None] / count
    with pytest.raises(AssertionError, match="relative norm error"):
        assert_close_to_reference(without_term.bfloat16(), ref64.grad, same.grad, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, 1e-20], ids=["zero_rows", "tiny_rows"])
def test_flat_logit_rows(dtype, scale):
    """All-zero and 1e-20 logits (a uniform softmax; fp16 holds 1e-20 as 0): the loss is log V and the
    gradient 1/V - target on every valid row, with smoothing and softcap on."""
    logits = (_logits((2, 5, 70), torch.float32, seed=20).detach().double() * scale).to(dtype).requires_grad_()
    target = _targets((2, 5), 70, seed=20)
    _check(logits, target, dtype, softcap=15.0, label_smoothing=0.1)
    _check(logits, target, dtype, reduction="none")


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"reduction": "sum"},
        {"reduction": "none"},
        {"label_smoothing": 0.25},
        {"label_smoothing": 0.1, "reduction": "sum"},
    ],
)
def test_reference_agrees_with_torch(options):
    logits, target = _logits((5, 7, 50), torch.float64, seed=4), _targets((5, 7), 50, seed=4)
    ours = reference_cross_entropy(logits, target, **options)
    torch_loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, **options)
    torch.testing.assert_close(ours, torch_loss)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(4, 3, 64), (0, 64)])
def test_all_ignored_or_empty_gives_zero_loss_and_grad(reduction, shape):
    logits = _logits(shape, torch.bfloat16, seed=5)
    target = torch.full(shape[:-1], IGNORE)
    loss = cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
    (grad,) = torch.autograd.grad(loss.sum(), [logits])
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    assert (loss == 0).all() and (grad == 0).all() and grad.shape == logits.shape


def test_backward_from_loss_alone_and_scaled():
    logits, target = _logits((6, 300), torch.float32, seed=6), _targets((6,), 300, seed=6)
    ref64 = logits.detach().double().requires_grad_()
    reference_cross_entropy(ref64, target).backward()
    cross_entropy(logits, target).backward()  # grad_output 1: the scaling kernel returns at once
    torch.testing.assert_close(logits.grad, ref64.grad.float())
    logits.grad = None
    (cross_entropy(logits, target) * 0.25).backward()
    torch.testing.assert_close(logits.grad, 0.25 * ref64.grad.float())


def test_overwrite_logits_reuses_their_memory():
    base, target = _logits((4, 5, 120), torch.bfloat16, seed=7), _targets((4, 5), 120, seed=7)
    logits = base * 1.0  # a non-leaf, as an LM head's output is
    loss = cross_entropy(logits, target, overwrite_logits=True)
    expected64 = base.detach().double().requires_grad_()
    reference_cross_entropy(expected64, target).backward()
    # The buffer now holds d loss / d logits (grad_output 1, so it is also the final gradient).
    assert_close_to_reference(logits.detach(), expected64.grad, None, torch.bfloat16, "overwritten logits")
    loss.backward()
    assert_close_to_reference(base.grad, expected64.grad, None, torch.bfloat16, "grad of logits")


def test_overwrite_logits_leaves_a_leaf_untouched():
    logits, target = _logits((3, 90), torch.float32, seed=8), _targets((3,), 90, seed=8)
    before = logits.detach().clone()
    cross_entropy(logits, target, overwrite_logits=True).backward()
    assert torch.equal(logits.detach(), before) and logits.grad is not None


def test_overwrite_logits_saved_by_another_op_raises_instead_of_corrupting():
    logits, target = _logits((3, 90), torch.float32, seed=9), _targets((3,), 90, seed=9)
    capped = torch.tanh(logits)  # tanh saves its output for backward: exactly the buffer overwritten
    loss = cross_entropy(capped, target, overwrite_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(
    "shape, index",
    [((3, 6, 80), (slice(None), slice(None, -1))), ((2, 3, 4, 80), (slice(None), slice(None, -1), slice(None, -1)))],
    ids=["causal-shift-read-in-place", "4d-unmergeable-copied"],
)
def test_strided_logits(overwrite, shape, index):
    base = _logits(shape, torch.bfloat16, seed=10)
    target = _targets(tuple(base[index].shape[:-1]), 80, seed=10)
    loss = cross_entropy((base * 1.0)[index], target, overwrite_logits=overwrite)
    expected64 = base.detach().double().requires_grad_()
    expected_loss = reference_cross_entropy(expected64[index], target)
    expected_loss.backward()
    loss.backward()
    assert_close_to_reference(loss, expected_loss, None, torch.bfloat16, "loss")
    assert_close_to_reference(base.grad, expected64.grad, None, torch.bfloat16, "grad through the slice")


def test_last_dim_not_unit_stride_is_copied():
    base, target = _logits((2, 70, 4), torch.float32, seed=11), _targets((2, 4), 70, seed=11)
    _check(base.transpose(1, 2), target, torch.float32, reduction="none")


def test_backward_twice_raises():
    logits, target = _logits((2, 50), torch.float32, seed=12), _targets((2,), 50, seed=12, ignore_fraction=0.0)
    loss = cross_entropy(logits, target) * 2.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_computes_loss_only():
    logits, target = _logits((4, 64), torch.float16, seed=13), _targets((4,), 64, seed=13)
    with torch.no_grad():
        loss = cross_entropy(logits, target, reduction="sum")
    expected = reference_cross_entropy(logits.detach().double(), target, reduction="sum")
    assert_close_to_reference(loss, expected, None, torch.float16)


def test_module_matches_function():
    logits, target = _logits((3, 77), torch.float32, seed=14), _targets((3,), 77, seed=14)
    module = CrossEntropyLoss(reduction="sum", softcap=5.0, label_smoothing=0.05)
    expected = cross_entropy(logits, target, reduction="sum", softcap=5.0, label_smoothing=0.05)
    torch.testing.assert_close(module(logits, target), expected, rtol=0, atol=0)
    assert "softcap=5.0" in repr(module)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"reduction": "avg"}, ValueError, "choose one of: mean, sum, none"),
        ({"softcap": 0.0}, ValueError, "positive"),
        ({"label_smoothing": 1.5}, ValueError, r"\[0, 1\]"),
        ({"target": torch.zeros(3, 1, dtype=torch.long)}, ValueError, "without the class dim"),
        ({"target": torch.zeros(3)}, TypeError, "int64/int32"),
        ({"logits": torch.zeros(3, 10, dtype=torch.float64)}, TypeError, "supported"),
    ],
)
def test_invalid_arguments_say_what_to_do(kwargs, error, match):
    args = {"logits": torch.zeros(3, 10), "target": torch.zeros(3, dtype=torch.long)} | kwargs
    with pytest.raises(error, match=match):
        cross_entropy(**args)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) shapes/strides and autograd registration of the ops torch.compile sees."""
    logits, target = _logits((2, 3, 40), torch.float32, seed=15), _targets((2, 3), 40, seed=15)
    for reduction, softcap, compute_grad in [("none", 4.0, True), ("mean", None, False)]:
        args = (logits, target, IGNORE, reduction, softcap, 0.1, compute_grad)
        torch.library.opcheck(torch.ops.optkit.cross_entropy.default, args, test_utils=OPCHECKS)
    grad = torch.randn(2, 3, 40)
    for factor in (torch.tensor(0.5), torch.rand(2, 3)):
        torch.library.opcheck(torch.ops.optkit.cross_entropy_scale_grad_.default, (grad, factor), test_utils=OPCHECKS)


def _compile_case(backend, device, shape=(2, 5, 300), dtype=torch.float32):
    logits = _logits(shape, dtype, seed=16, device=device)
    target = _targets(shape[:-1], shape[-1], seed=16, device=device)

    def fn(x):
        return cross_entropy(x * 1.0, target, softcap=20.0, label_smoothing=0.1) * 0.5

    eager_loss = fn(logits)
    (eager_grad,) = torch.autograd.grad(eager_loss, [logits])
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=recording_backend, fullgraph=True)
    loss = compiled(logits)
    (grad,) = torch.autograd.grad(loss, [logits])
    assert len(graphs) == 1 and "optkit.cross_entropy" in graphs[0]
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(grad, eager_grad)


def test_compiles_without_graph_break():
    _compile_case("aot_eager", "cpu")


@pytest.mark.gpu
def test_compiles_with_inductor_on_gpu():
    _compile_case("inductor", "cuda", shape=(4, 512, 32000), dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("softcap, label_smoothing", [(None, 0.0), (30.0, 0.1)])
def test_llama3_vocab_on_gpu(softcap, label_smoothing):
    """4096 tokens x 128256 classes in bf16: loss and gradient vs float64, with 10% ignored tokens."""
    logits = _logits((4096, 128256), torch.bfloat16, seed=17, device="cuda")
    target = _targets((4096,), 128256, seed=17, ignore_fraction=0.1, device="cuda")
    _check(logits, target, torch.bfloat16, softcap=softcap, label_smoothing=label_smoothing)


@pytest.mark.gpu
@pytest.mark.parametrize("overwrite", [False, True])
def test_gradient_memory_on_gpu(overwrite):
    """The fresh-buffer mode holds one logits-sized gradient; overwrite_logits holds none."""
    rows, vocab = 4096, 128256
    logits_bytes = rows * vocab * 2
    base = _logits((rows, vocab), torch.bfloat16, seed=18, device="cuda")
    target = _targets((rows,), vocab, seed=18, device="cuda")
    logits = base * 1.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start_bytes = torch.cuda.memory_allocated()
    cross_entropy(logits, target, overwrite_logits=overwrite).backward()
    torch.cuda.synchronize()
    extra_bytes = torch.cuda.max_memory_allocated() - start_bytes
    slack_bytes = 16 * 2**20  # per-row fp32 losses, the target mask, the allocator's rounding
    # base.grad (one logits-sized buffer) is produced in both modes by the multiply's backward.
    expected = (1 if overwrite else 2) * logits_bytes + slack_bytes
    assert extra_bytes <= expected, f"peak extra {extra_bytes / 2**20:.0f} MiB > {expected / 2**20:.0f} MiB"
