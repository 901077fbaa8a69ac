"""optkit.kernels.geglu (both GELU forms) against its float64 reference and HF's Gemma2MLP.

Tolerances: tests/kernels/_tolerances.py (relative norm error per dtype, and fused max error <= 2x plain
PyTorch's in the same dtype + 1 ulp of the tensor's own scale).
"""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Gemma2Config
from transformers.models.gemma2.modeling_gemma2 import Gemma2MLP

from optkit.kernels.geglu import GeGLUMLP, geglu, reference_geglu
from tests.kernels._tolerances import (
    COMPILE_BACKENDS,
    DEVICE,
    OPCHECKS,
    check_compiles_fullgraph,
    check_forward_backward,
    check_module_matches,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMS = ["tanh", "none"]


def _inputs(shape, dtype, seed, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_()
    up = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    return gate, up


def _check(gate, up, approximate, dtype, seed=0):
    fused = functools.partial(geglu, approximate=approximate)
    reference = functools.partial(reference_geglu, approximate=approximate)
    check_forward_backward(fused, reference, [gate, up], dtype, seed)


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    approximate=st.sampled_from(FORMS),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_match_reference(shape, dtype, approximate, seed):
    gate, up = _inputs(tuple(shape), dtype, seed)
    _check(gate, up, approximate, dtype, seed)


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, 1e-20], ids=["zero_rows", "tiny_rows"])
def test_flat_rows(scale, dtype, approximate):
    """Rows of gate all zero or at 1e-20 (fp16 holds it as 0) beside ordinary rows: gelu is ~gate / 2 there."""
    gate, up = _inputs((6, 40), dtype, seed=5)
    gate = gate.detach()
    gate[::2] = (gate[::2].double() * scale).to(dtype)
    _check(gate.requires_grad_(), up, approximate, dtype)


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("shape", [(1, 7), (3, 3584)])
def test_model_sizes_and_partial_last_block(shape, approximate):
    gate, up = _inputs(shape, torch.bfloat16, seed=sum(shape))
    _check(gate, up, approximate, torch.bfloat16)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy under the interpreter
@pytest.mark.parametrize("approximate", FORMS)
def test_tails_and_non_contiguous_inputs(approximate):
    gate = torch.tensor([[-1e4, -100.0, -30.0, -3.0, 0.0], [1e-3, 3.0, 30.0, 100.0, 1e4]], device=DEVICE)
    gate = gate.t().requires_grad_()
    up = torch.randn(2, 5, generator=torch.Generator().manual_seed(1)).to(DEVICE).t().requires_grad_()
    _check(gate, up, approximate, torch.float32)


def _gemma2_mlp(dtype, activation="gelu_pytorch_tanh", seed=2):
    torch.manual_seed(seed)
    config = Gemma2Config(hidden_size=32, intermediate_size=48, hidden_activation=activation)
    return Gemma2MLP(config).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_drop_in_equals_gemma2_mlp(dtype):
    hf = _gemma2_mlp(dtype)
    ours = GeGLUMLP.from_module(hf)
    assert ours.approximate == "tanh"  # read from Gemma2's hidden_activation
    assert ours.gate_proj is hf.gate_proj and ours.up_proj is hf.up_proj and ours.down_proj is hf.down_proj
    assert list(ours.state_dict()) == list(hf.state_dict())
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype).requires_grad_()
    check_module_matches(ours, hf, x, dtype)


def test_mlp_drop_in_exact_gelu():
    hf = _gemma2_mlp(torch.float32, activation="gelu")
    ours = GeGLUMLP.from_module(hf)
    assert ours.approximate == "none"
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE).requires_grad_()
    check_module_matches(ours, hf, x, torch.float32)


def test_from_module_refuses_to_change_the_model():
    with pytest.raises(ValueError, match="approximate='none'"):
        GeGLUMLP.from_module(_gemma2_mlp(torch.float32), approximate="none")
    with pytest.raises(ValueError, match="SwiGLUMLP"):
        GeGLUMLP.from_module(_gemma2_mlp(torch.float32, activation="silu"))
    with pytest.raises(ValueError, match="approximate"):
        geglu(torch.randn(2), torch.randn(2), approximate="erf")


def test_custom_ops_pass_opcheck():
    gate, up = _inputs((3, 5), torch.float32, seed=5)
    for approximate in FORMS:
        torch.library.opcheck(torch.ops.optkit.geglu_fwd.default, (gate, up, approximate), test_utils=OPCHECKS)
        args = (torch.randn(3, 5, device=DEVICE), gate.detach(), up.detach(), approximate)
        torch.library.opcheck(torch.ops.optkit.geglu_bwd.default, args, test_utils=OPCHECKS)


@COMPILE_BACKENDS
def test_compile_fullgraph(backend, device):
    gate, up = _inputs((4, 33), torch.float32, seed=6, device=device)

    def loss(g, u):
        return (geglu(g, u, "tanh") ** 2).sum() + geglu(g, u, "none").sum()

    check_compiles_fullgraph(loss, [gate, up], backend, "geglu_fwd")


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", FORMS)
def test_gpu_gemma_shape(approximate):
    """4096 tokens x Gemma-2-9B's intermediate size 14336, bf16."""
    gate, up = _inputs((4096, 14336), torch.bfloat16, seed=7, device="cuda")
    _check(gate, up, approximate, torch.bfloat16)
