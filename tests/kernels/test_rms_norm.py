"""optkit.kernels.rms_norm against its float64 reference and against HF's RMSNorm modules.

Tolerances: tests/kernels/_tolerances.py (relative norm error per dtype, and fused max error <= 2x plain
PyTorch's in the same dtype + 1 ulp of the tensor's own scale).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from optkit.kernels.rms_norm import RMSNorm, reference_rms_norm, rms_norm
from tests.kernels._tolerances import (
    COMPILE_BACKENDS,
    DEVICE,
    OPCHECKS,
    check_compiles_fullgraph,
    check_forward_backward,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = [("llama", 0.0), ("gemma", 1.0)]


def _inputs(shape, dtype, seed, weight_dtype=None, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_()
    # Around 1 (llama) / around 0 (gemma's 1 + w) alike: a spread that makes the weight matter.
    weight = (torch.randn(shape[-1], generator=gen) * 0.5 + 0.5).to(device=device, dtype=weight_dtype or dtype)
    return x, weight.requires_grad_()


def _check(x, weight, mode, offset, dtype, seed=0, eps=1e-6):
    check_forward_backward(
        lambda x, w: rms_norm(x, w, eps, offset, mode),
        lambda x, w: reference_rms_norm(x, w, eps, offset, mode),
        [x, weight],
        dtype,
        seed,
    )


# At least 2 columns: over a single column x * rstd is sign(x) up to eps, so d/dx is a residue of eps that no
# dtype computes to a relative tolerance (test_single_column_rows checks that case with an eps that matters).
@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.one_of(st.sampled_from([2, 7, 64, 100]), st.integers(2, 300)),
    lead=st.sampled_from([(), (2,), (2, 3)]),
    dtype=st.sampled_from(DTYPES),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_match_reference(rows, cols, lead, dtype, mode, seed):
    x, weight = _inputs((*lead, rows, cols), dtype, seed)
    _check(x, weight, *mode, dtype, seed)


@pytest.mark.parametrize("cols", [2880, 3584, 5120])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_hidden_sizes(cols, dtype):
    x, weight = _inputs((3, cols), dtype, seed=cols)
    _check(x, weight, "llama", 0.0, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_weight_grad_sums_over_many_row_blocks(mode):
    """1000 rows of 33: 16 row blocks over the interpreter's 4 programs, 4 grid-stride steps each."""
    x, weight = _inputs((1000, 33), torch.float32, seed=12)
    _check(x, weight, *mode, torch.float32)


def test_non_contiguous_input_and_frozen_weight():
    base, weight = _inputs((6, 4, 48), torch.bfloat16, seed=1)
    x = base.detach().transpose(0, 1).requires_grad_()  # (4, 6, 48), rows not evenly strided
    weight.requires_grad_(False)  # LoRA: norms are frozen, only dx is computed
    _check(x, weight, "llama", 0.0, torch.bfloat16)
    _check(x, weight, "gemma", 1.0, torch.bfloat16)


def test_fp32_weight_with_half_input_promotes_like_hf():
    x, weight = _inputs((5, 40), torch.bfloat16, seed=2, weight_dtype=torch.float32)
    assert rms_norm(x, weight).dtype == torch.float32  # HF: fp32 weight * bf16 row -> fp32
    _check(x, weight, "llama", 0.0, torch.bfloat16)


# Rows far from N(0, 1), where eps decides the result: all-zero rows (rstd = eps^-1/2, finite only with eps),
# rows at 1e-20 (x^2 underflows next to eps; fp16 cannot hold 1e-20, its smallest normal is 6e-5), and rows
# whose mean square is eps itself. A kernel without ``+ eps`` gives NaN, or outputs ~1 instead of ~x / sqrt(eps).
TINY = {torch.float32: 1e-20, torch.bfloat16: 1e-20, torch.float16: 1e-4}


def _edge_rows(kind, dtype, seed):
    x, weight = _inputs((6, 48), dtype, seed)
    x = x.detach()
    if kind == "zero_rows":
        x[::2] = 0.0  # rows 0, 2, 4 all zero beside ordinary rows
    elif kind == "tiny_rows":
        x = (x.double() * TINY[dtype]).to(dtype)
    elif kind == "rows_at_eps":
        x = (x.double() * 0.05).to(dtype)  # mean square 0.01 = eps
    return x.requires_grad_(), weight


@pytest.mark.parametrize("kind, eps", [("zero_rows", 1e-6), ("tiny_rows", 1e-6), ("rows_at_eps", 1e-2)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_rows_where_eps_decides(kind, eps, dtype, mode):
    x, weight = _edge_rows(kind, dtype, seed=21)
    _check(x, weight, *mode, dtype, eps=eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_column_rows(dtype):
    """One column: y = w * x / sqrt(x^2 + eps); with eps = 1 its input gradient is well-conditioned."""
    x, weight = _inputs((9, 1), dtype, seed=22)
    _check(x, weight, "llama", 0.0, dtype, eps=1.0)


def _hf_pair(hf_cls, hidden, eps, dtype, seed):
    hf = hf_cls(hidden, eps=eps)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.5)
    hf = hf.to(device=DEVICE, dtype=dtype)
    return hf, RMSNorm.from_module(hf)


@pytest.mark.parametrize("hf_cls", [LlamaRMSNorm, Gemma2RMSNorm])
@pytest.mark.parametrize("dtype", DTYPES)
def test_drop_in_equals_hf_module(hf_cls, dtype):
    hf, ours = _hf_pair(hf_cls, 96, 1e-5, dtype, seed=3)
    assert ours.weight is hf.weight and list(ours.state_dict()) == list(hf.state_dict()) == ["weight"]
    assert ours.eps == 1e-5 and ours.cast_mode == ("gemma" if hf_cls is Gemma2RMSNorm else "llama")

    # The HF module itself is the reference (its float64 run computes in fp32: HF upcasts with .float()).
    def hf_forward(x, weight):
        return torch.func.functional_call(hf, {"weight": weight}, (x,))

    x, _ = _inputs((2, 9, 96), dtype, seed=4)

    def ours_forward(x, weight):
        return torch.func.functional_call(ours, {"weight": weight}, (x,))

    check_forward_backward(ours_forward, hf_forward, [x, hf.weight], dtype)


# bf16 only on the GPU: the CPU interpreter truncates fp32 -> bf16 instead of rounding (fp16 it rounds).
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("hf_cls", [LlamaRMSNorm, Gemma2RMSNorm])
def test_rounding_order_matches_hf(hf_cls, dtype):
    """Same rounding order as HF -> equal almost everywhere.

    Multiplying by the weight before rounding instead of after (or the reverse) differs from HF in a
    large share of elements; only rstd's summation order may flip a rare last bit.
    """
    hf, ours = _hf_pair(hf_cls, 256, 1e-6, dtype, seed=5)
    x, _ = _inputs((16, 256), dtype, seed=6)
    with torch.no_grad():
        mismatch = (ours(x) != hf(x)).float().mean().item()
    assert mismatch < 0.01, f"{mismatch:.1%} of elements differ from {hf_cls.__name__}"


def test_from_module_rejects_non_norm():
    with pytest.raises(TypeError, match="RMSNorm"):
        RMSNorm.from_module(torch.nn.Linear(4, 4))


def test_bad_arguments_say_what_to_do():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="cast_mode"):
        rms_norm(x, torch.ones(8), cast_mode="t5")
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(TypeError, match="dtype"):
        rms_norm(x.double(), torch.ones(8, dtype=torch.float64))


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) shapes/strides and autograd registration of the ops torch.compile sees."""
    x, weight = _inputs((3, 2, 24), torch.float32, seed=7)
    torch.library.opcheck(torch.ops.optkit.rms_norm_fwd.default, (x, weight, 1e-6, 0.0, True), test_utils=OPCHECKS)
    rstd, dy = torch.rand(3, 2, device=DEVICE) + 0.5, torch.randn(3, 2, 24, device=DEVICE)
    for compute_dw in (True, False):
        args = (dy, x.detach(), weight.detach(), rstd, 1.0, False, compute_dw)
        torch.library.opcheck(torch.ops.optkit.rms_norm_bwd.default, args, test_utils=OPCHECKS)


@COMPILE_BACKENDS
def test_compile_fullgraph(backend, device):
    x, weight = _inputs((4, 3, 40), torch.float32, seed=8, device=device)

    def loss(x, w):
        return (rms_norm(x, w, 1e-6, 1.0, "gemma") ** 2).sum()

    check_compiles_fullgraph(loss, [x, weight], backend, "rms_norm_fwd")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_llama3_8b_shape(mode):
    x, weight = _inputs((4096, 4096), torch.bfloat16, seed=9, device="cuda")
    _check(x, weight, *mode, torch.bfloat16)
