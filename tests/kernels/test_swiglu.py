"""optkit.kernels.swiglu against its float64 reference and HF's LlamaMLP.

Tolerances: tests/kernels/_tolerances.py (relative norm error per dtype, and fused max error <= 2x plain
PyTorch's in the same dtype + 1 ulp of the tensor's own scale).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, inject_adapter_in_model
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from optkit.kernels.swiglu import SwiGLUMLP, reference_swiglu, swiglu
from tests.kernels._tolerances import (
    COMPILE_BACKENDS,
    DEVICE,
    OPCHECKS,
    check_compiles_fullgraph,
    check_forward_backward,
    check_module_matches,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(shape, dtype, seed, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    # gate spread over silu's curved region and both tails
    gate = (torch.randn(shape, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_()
    up = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    return gate, up


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_match_reference(shape, dtype, seed):
    gate, up = _inputs(tuple(shape), dtype, seed)
    check_forward_backward(swiglu, reference_swiglu, [gate, up], dtype, seed)


@pytest.mark.parametrize("shape", [(1, 7), (2, 3, 2880), (3, 14336)])
def test_model_sizes_and_partial_last_block(shape):
    gate, up = _inputs(shape, torch.bfloat16, seed=sum(shape))
    check_forward_backward(swiglu, reference_swiglu, [gate, up], torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, 1e-20], ids=["zero_rows", "tiny_rows"])
def test_flat_rows(dtype, scale):
    """Rows of gate all zero or at 1e-20 (fp16 holds it as 0) beside ordinary rows: silu is ~gate / 2 there."""
    gate, up = _inputs((6, 40), dtype, seed=3)
    gate = gate.detach()
    gate[::2] = (gate[::2].double() * scale).to(dtype)
    check_forward_backward(swiglu, reference_swiglu, [gate.requires_grad_(), up], dtype)


def test_non_contiguous_inputs_are_copied():
    gate, up = _inputs((6, 20), torch.float16, seed=1)
    gate_t, up_t = gate.detach().t().requires_grad_(), up.detach().t().requires_grad_()  # (20, 6) views
    check_forward_backward(swiglu, reference_swiglu, [gate_t, up_t], torch.float16)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy under the interpreter
def test_tails_stay_finite():
    gate = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4], device=DEVICE).requires_grad_()
    up = torch.ones(7, device=DEVICE, requires_grad=True)
    check_forward_backward(swiglu, reference_swiglu, [gate, up], torch.float32)


def _llama_mlp(dtype, seed=2):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="silu")
    return LlamaMLP(config).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_drop_in_equals_llama_mlp(dtype):
    hf = _llama_mlp(dtype)
    ours = SwiGLUMLP.from_module(hf)
    assert ours.gate_proj is hf.gate_proj and ours.up_proj is hf.up_proj and ours.down_proj is hf.down_proj
    assert list(ours.state_dict()) == list(hf.state_dict())
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype).requires_grad_()
    check_module_matches(ours, hf, x, dtype)


def test_mlp_drop_in_keeps_lora_wrappers():
    hf = inject_adapter_in_model(
        LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]), _llama_mlp(torch.float32)
    )
    for name, p in hf.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:  # peft starts B at zero; make the adapters count
            torch.nn.init.normal_(p, std=0.1)
    ours = SwiGLUMLP.from_module(hf)
    assert ours.gate_proj is hf.gate_proj and list(ours.state_dict()) == list(hf.state_dict())
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE).requires_grad_()
    check_module_matches(ours, hf, x, torch.float32)


def test_from_module_rejects_other_activations():
    gelu_mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=16, hidden_act="gelu"))
    with pytest.raises(ValueError, match="GeGLUMLP"):
        SwiGLUMLP.from_module(gelu_mlp)
    with pytest.raises(TypeError, match="gate_proj"):
        SwiGLUMLP.from_module(torch.nn.Linear(4, 4))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 3), torch.randn(3, 2))


def test_custom_ops_pass_opcheck():
    gate, up = _inputs((3, 5), torch.float32, seed=5)
    torch.library.opcheck(torch.ops.optkit.swiglu_fwd.default, (gate, up), test_utils=OPCHECKS)
    args = (torch.randn(3, 5, device=DEVICE), gate.detach(), up.detach().to(torch.bfloat16))
    torch.library.opcheck(torch.ops.optkit.swiglu_bwd.default, args, test_utils=OPCHECKS)


@COMPILE_BACKENDS
def test_compile_fullgraph(backend, device):
    gate, up = _inputs((4, 33), torch.float32, seed=6, device=device)
    check_compiles_fullgraph(lambda g, u: (swiglu(g, u) ** 2).sum(), [gate, up], backend, "swiglu_fwd")


@pytest.mark.gpu
def test_gpu_llama3_8b_shape():
    gate, up = _inputs((4096, 14336), torch.bfloat16, seed=7, device="cuda")
    check_forward_backward(swiglu, reference_swiglu, [gate, up], torch.bfloat16)
