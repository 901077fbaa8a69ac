"""optkit.kernels.rope against its float64 reference and HF's apply_rotary_pos_emb.

Tolerances: tests/kernels/_tolerances.py (relative norm error per dtype, and fused max error <= 2x plain
PyTorch's in the same dtype + 1 ulp of the tensor's own scale).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from optkit.kernels.rope import apply_rotary, reference_rope
from tests.kernels._tolerances import (
    COMPILE_BACKENDS,
    DEVICE,
    OPCHECKS,
    check_compiles_fullgraph,
    check_forward_backward,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _heads(batch, n_heads, seq_len, head_dim, dtype, gen, layout, device=DEVICE):
    """(B, H, S, D) either contiguous or as HF makes it: ``view(B, S, H, D).transpose(1, 2)``."""
    if layout == "hf":
        t = torch.randn(batch, seq_len, n_heads, head_dim, generator=gen).transpose(1, 2)
    else:
        t = torch.randn(batch, n_heads, seq_len, head_dim, generator=gen)
    return t.to(device=device, dtype=dtype).requires_grad_()


def _cos_sin(cos_batch, seq_len, head_dim, dtype, gen, device=DEVICE):
    """Arbitrary angles per token (packed sequences); shape (S, D) when cos_batch is None."""
    lead = () if cos_batch is None else (cos_batch,)
    angles = torch.rand(*lead, seq_len, head_dim // 2, generator=gen) * 6.3
    angles = torch.cat((angles, angles), dim=-1)  # HF's layout: both halves carry the same angles
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def _check(batch, n_kv, group, seq_len, head_dim, dtype, layout, cos_batch, seed, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q = _heads(batch, n_kv * group, seq_len, head_dim, dtype, gen, layout, device)
    k = _heads(batch, n_kv, seq_len, head_dim, dtype, gen, layout, device)
    cos, sin = _cos_sin(cos_batch, seq_len, head_dim, dtype, gen, device)
    check_forward_backward(apply_rotary, reference_rope, [q, k, cos, sin], dtype, seed)


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2),
    n_kv=st.integers(1, 2),
    group=st.integers(1, 3),
    seq_len=st.integers(1, 5),
    head_dim=st.sampled_from([2, 6, 8, 32, 80]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["hf", "contiguous"]),
    cos_batch=st.sampled_from([None, 1, "batch"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_match_reference(batch, n_kv, group, seq_len, head_dim, dtype, layout, cos_batch, seed):
    cos_batch = batch if cos_batch == "batch" else cos_batch
    _check(batch, n_kv, group, seq_len, head_dim, dtype, layout, cos_batch, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, 1e-20], ids=["zero_rows", "tiny_rows"])
def test_flat_token_rows(dtype, scale):
    """Every other token's q and k all zero or at 1e-20 (fp16 holds it as 0), beside ordinary tokens."""
    gen = torch.Generator().manual_seed(5)
    q = _heads(2, 4, 6, 16, dtype, gen, "hf").detach()
    k = _heads(2, 2, 6, 16, dtype, gen, "contiguous").detach()
    for t in (q, k):
        t[:, :, ::2] = (t[:, :, ::2].double() * scale).to(dtype)
    cos, sin = _cos_sin(2, 6, 16, dtype, gen)
    check_forward_backward(apply_rotary, reference_rope, [q.requires_grad_(), k.requires_grad_(), cos, sin], dtype)


def test_general_cos_sin_whose_halves_differ():
    """The backward is the exact transpose also for cos/sin that are not HF's duplicated halves."""
    gen = torch.Generator().manual_seed(1)
    q = _heads(2, 4, 3, 8, torch.float32, gen, "hf")
    k = _heads(2, 2, 3, 8, torch.float32, gen, "contiguous")
    cos, sin = torch.randn(2, 3, 8, generator=gen).to(DEVICE), torch.randn(2, 3, 8, generator=gen).to(DEVICE)
    check_forward_backward(apply_rotary, reference_rope, [q, k, cos, sin], torch.float32)


def _hf_attention_inputs(dtype, position_ids):
    """q/k exactly as LlamaAttention builds them, and cos/sin from LlamaRotaryEmbedding."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    batch, seq_len = position_ids.shape
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(batch, seq_len, config.hidden_size, generator=gen).to(DEVICE, dtype)
    q_proj = torch.randn(config.hidden_size, 4 * 16, generator=gen).to(DEVICE, dtype) * 0.2
    k_proj = torch.randn(config.hidden_size, 2 * 16, generator=gen).to(DEVICE, dtype) * 0.2
    q = (hidden @ q_proj).view(batch, seq_len, -1, 16).transpose(1, 2).detach().requires_grad_()
    k = (hidden @ k_proj).view(batch, seq_len, -1, 16).transpose(1, 2).detach().requires_grad_()
    cos, sin = LlamaRotaryEmbedding(config).to(DEVICE)(hidden, position_ids.to(DEVICE))
    return q, k, cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_hf_apply_rotary_pos_emb_on_packed_positions(dtype):
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 6, 7]])  # row 0: 3 packed docs
    q, k, cos, sin = _hf_attention_inputs(dtype, position_ids)
    assert not q.is_contiguous()  # the transposed view HF hands to apply_rotary_pos_emb
    check_forward_backward(apply_rotary, apply_rotary_pos_emb, [q, k, cos, sin], dtype)
    q_rot, _ = apply_rotary(q, k, cos, sin)
    assert q_rot.stride() == q.stride()  # output in the input's memory layout, as HF's eager ops give


def test_non_contiguous_upstream_gradient():
    gen = torch.Generator().manual_seed(3)
    q = _heads(2, 4, 5, 8, torch.float32, gen, "contiguous")
    k = _heads(2, 2, 5, 8, torch.float32, gen, "hf")
    cos, sin = _cos_sin(2, 5, 8, torch.float32, gen)
    dq_rot = torch.randn(2, 5, 4, 8, generator=gen).to(DEVICE).transpose(1, 2)  # (B, H, S, D) view, S-major
    dk_rot = torch.randn(2, 2, 8, 5, generator=gen).to(DEVICE).transpose(2, 3)  # D not innermost: copied
    grads = torch.autograd.grad(apply_rotary(q, k, cos, sin), [q, k], [dq_rot, dk_rot])
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref = torch.autograd.grad(
        reference_rope(q64, k64, cos.double(), sin.double()), [q64, k64], [dq_rot.double(), dk_rot.double()]
    )
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


def test_head_dim_not_innermost_is_copied():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 8, 3, generator=gen).to(DEVICE).transpose(2, 3).requires_grad_()  # stride(-1) == 3
    k = torch.randn(1, 1, 3, 8, generator=gen).to(DEVICE).requires_grad_()
    cos, sin = _cos_sin(None, 3, 8, torch.float32, gen)
    check_forward_backward(apply_rotary, reference_rope, [q, k, cos, sin], torch.float32)


def test_bad_arguments_say_what_to_do():
    q, k = torch.randn(1, 2, 3, 6), torch.randn(1, 1, 3, 6)
    cos, sin = torch.randn(3, 6), torch.randn(3, 6)
    with pytest.raises(ValueError, match="even"):
        apply_rotary(q[..., :5], k[..., :5], cos[:, :5], sin[:, :5])
    with pytest.raises(ValueError, match="detach"):
        apply_rotary(q, k, cos.requires_grad_(), sin)
    with pytest.raises(ValueError, match=r"\(S, D\)"):
        apply_rotary(q, k, cos.detach()[:2], sin[:2])
    with pytest.raises(ValueError, match="except in heads"):
        apply_rotary(q, torch.randn(1, 1, 4, 6), cos.detach(), sin)


def test_custom_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(5)
    q = _heads(2, 2, 3, 8, torch.float32, gen, "hf")
    k = _heads(2, 1, 3, 8, torch.float32, gen, "contiguous")
    cos, sin = _cos_sin(2, 3, 8, torch.float32, gen)
    torch.library.opcheck(torch.ops.optkit.rope_fwd.default, (q, k, cos, sin), test_utils=OPCHECKS)
    args = (q.detach(), k.detach(), cos, sin, torch.bfloat16, torch.float32)
    torch.library.opcheck(torch.ops.optkit.rope_bwd.default, args, test_utils=OPCHECKS)


@COMPILE_BACKENDS
def test_compile_fullgraph(backend, device):
    gen = torch.Generator().manual_seed(6)
    q = _heads(2, 4, 3, 16, torch.float32, gen, "hf", device)
    k = _heads(2, 2, 3, 16, torch.float32, gen, "contiguous", device)
    cos, sin = _cos_sin(2, 3, 16, torch.float32, gen, device)

    def loss(q, k, cos, sin):
        q_rot, k_rot = apply_rotary(q, k, cos, sin)
        return (q_rot**2).sum() + (k_rot * torch.arange(16.0, device=k_rot.device)).sum()

    check_compiles_fullgraph(loss, [q, k, cos, sin], backend, "rope_fwd")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["hf", "contiguous"])
def test_gpu_llama3_8b_shape(layout):
    """4096 tokens (2 x 2048), 32 q / 8 kv heads of 128, per-token cos/sin, bf16."""
    _check(2, 8, 4, 2048, 128, torch.bfloat16, layout, 2, seed=7, device="cuda")
