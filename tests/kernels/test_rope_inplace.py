"""RoPE in place (``apply_rotary(..., inplace=True)``) and chosen launch configs, against the float64 reference.

Tolerances: tests/kernels/_tolerances.py (fused error <= 2x plain PyTorch's in the same dtype + 1 ulp). The
helper there hands one upstream gradient to every backward, which an in-place backward overwrites, so these
tests keep their own copies and compare through ``assert_close_to_reference``.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optkit.kernels.rope import RopeLaunch, apply_rotary, default_rope_launch, launch_rope, reference_rope
from tests.kernels._tolerances import COMPILE_BACKENDS, DEVICE, assert_close_to_reference, check_compiles_fullgraph

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _heads(batch, n_heads, seq_len, head_dim, dtype, gen, layout):
    """(B, H, S, D) either contiguous or as HF makes it: ``view(B, S, H, D).transpose(1, 2)``."""
    if layout == "hf":
        t = torch.randn(batch, seq_len, n_heads, head_dim, generator=gen).transpose(1, 2)
    else:
        t = torch.randn(batch, n_heads, seq_len, head_dim, generator=gen)
    return t.to(device=DEVICE, dtype=dtype)


def _cos_sin(cos_batch, seq_len, head_dim, dtype, gen):
    lead = () if cos_batch is None else (cos_batch,)
    angles = torch.rand(*lead, seq_len, head_dim // 2, generator=gen) * 6.3
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(device=DEVICE, dtype=dtype), angles.sin().to(device=DEVICE, dtype=dtype)


def _leaf(t):
    return t.detach().clone().requires_grad_()  # clone keeps the (HF) strides


def _reference_and_grads(q, k, cos, sin, upstream, dtype64):
    """Outputs and (dq, dk) of plain PyTorch on copies of q, k in ``dtype64`` (float64: the truth)."""
    q_ref, k_ref = _leaf(q.to(dtype64)), _leaf(k.to(dtype64))
    outs = reference_rope(q_ref, k_ref, cos.to(dtype64), sin.to(dtype64))
    grads = torch.autograd.grad(outs, (q_ref, k_ref), [g.to(o.dtype) for g, o in zip(upstream, outs)])
    return outs, grads


def _check_in_place(batch, n_kv, group, seq_len, head_dim, dtype, layout, cos_batch, seed):
    gen = torch.Generator().manual_seed(seed)
    q0 = _heads(batch, n_kv * group, seq_len, head_dim, dtype, gen, layout)
    k0 = _heads(batch, n_kv, seq_len, head_dim, dtype, gen, layout)
    cos, sin = _cos_sin(cos_batch, seq_len, head_dim, dtype, gen)
    upstream = [torch.randn(t.shape, generator=gen).to(DEVICE, dtype) for t in (q0, k0)]
    ref64, grads64 = _reference_and_grads(q0, k0, cos, sin, upstream, torch.float64)
    same, grads_same = _reference_and_grads(q0, k0, cos, sin, upstream, dtype)

    q, k = _leaf(q0), _leaf(k0)
    out_q, out_k = apply_rotary(q, k, cos, sin, inplace=True)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr(), "forward did not write in place"
    assert torch.equal(q.detach(), out_q.detach()), "q itself must hold the rotated values"
    for name, out, r, s in (("q_rot", out_q, ref64[0], same[0]), ("k_rot", out_k, ref64[1], same[1])):
        assert out.dtype == s.dtype
        assert_close_to_reference(out, r, s, dtype, name=name)

    dq_in, dk_in = (g.clone() for g in upstream)  # the backward rotates these where they are
    dq, dk = torch.autograd.grad((out_q, out_k), (q, k), (dq_in, dk_in))
    for name, g, r, s in (("dq", dq, grads64[0], grads_same[0]), ("dk", dk, grads64[1], grads_same[1])):
        assert g.dtype == dtype
        assert_close_to_reference(g, r, s, dtype, name=name)
    assert dq.data_ptr() == dq_in.data_ptr() and dk.data_ptr() == dk_in.data_ptr(), "backward did not write in place"


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 2),
    n_kv=st.integers(1, 2),
    group=st.integers(1, 3),
    seq_len=st.integers(1, 4),
    head_dim=st.sampled_from([2, 6, 8, 32, 80]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["hf", "contiguous"]),
    cos_batch=st.sampled_from([None, 1, "batch"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_in_place_matches_reference_forward_and_backward(
    batch, n_kv, group, seq_len, head_dim, dtype, layout, cos_batch, seed
):
    cos_batch = batch if cos_batch == "batch" else cos_batch
    _check_in_place(batch, n_kv, group, seq_len, head_dim, dtype, layout, cos_batch, seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_at_llama_head_counts(dtype):
    """Llama-3's GQA (32 q heads over 8 kv heads, D=128) at a couple of tokens."""
    _check_in_place(1, 8, 4, 2, 128, dtype, "hf", None, seed=7)


def test_inputs_it_cannot_write_over_fall_back_to_the_out_of_place_result():
    gen = torch.Generator().manual_seed(3)
    wide = _heads(1, 2, 3, 16, torch.bfloat16, gen, "contiguous")
    q = _leaf(wide[..., ::2])  # last stride 2: the kernel needs unit stride
    k = _leaf(_heads(1, 1, 3, 8, torch.bfloat16, gen, "contiguous"))
    cos, sin = _cos_sin(None, 3, 8, torch.float32, gen)  # fp32 cos/sin: the result is fp32, not q's bf16
    before = q.detach().clone()
    out_q, out_k = apply_rotary(q, k, cos, sin, inplace=True)
    assert out_q.dtype == torch.float32 and torch.equal(q.detach(), before), "q must be left as it was"
    ref = reference_rope(q.detach().double(), k.detach().double(), cos.double(), sin.double())
    same = reference_rope(q.detach(), k.detach(), cos, sin)
    assert_close_to_reference(out_q, ref[0], same[0], torch.bfloat16, name="q_rot")


def test_a_saved_unrotated_q_makes_backward_fail_instead_of_using_rotated_values():
    gen = torch.Generator().manual_seed(4)
    x = _leaf(_heads(1, 2, 3, 8, torch.float32, gen, "contiguous"))
    k = _leaf(_heads(1, 2, 3, 8, torch.float32, gen, "contiguous"))
    cos, sin = _cos_sin(None, 3, 8, torch.float32, gen)
    q = x * 1.0
    squared = q * q  # saves q for its backward
    q_rot, k_rot = apply_rotary(q, k * 1.0, cos, sin, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad((squared.sum() + q_rot.sum() + k_rot.sum()), (x, k))


@COMPILE_BACKENDS
def test_compiled_in_place_call_runs_the_functional_op_without_graph_break(backend, device):
    """Under torch.compile the in-place request takes the custom op (Dynamo cannot trace a raw pointer
    write); the loss and gradients equal eager's in-place run."""
    gen = torch.Generator().manual_seed(8)
    q = _leaf(_heads(1, 4, 3, 16, torch.float32, gen, "hf").to(device))
    k = _leaf(_heads(1, 2, 3, 16, torch.float32, gen, "hf").to(device))
    cos, sin = (t.to(device) for t in _cos_sin(None, 3, 16, torch.float32, gen))

    def loss(q, k, cos, sin):
        q_rot, k_rot = apply_rotary(q * 1.0, k * 1.0, cos, sin, inplace=True)  # leaves stay unrotated
        return (q_rot**2).sum() + (k_rot * torch.arange(16.0, device=k_rot.device)).sum()

    check_compiles_fullgraph(loss, [q, k, cos, sin], backend, "rope_fwd")


def test_q_and_k_in_one_buffer_is_an_error():
    gen = torch.Generator().manual_seed(5)
    q = _heads(1, 2, 3, 8, torch.float32, gen, "contiguous")
    cos, sin = _cos_sin(None, 3, 8, torch.float32, gen)
    with pytest.raises(ValueError, match="share memory"):
        apply_rotary(q, q, cos, sin, inplace=True)


@pytest.mark.parametrize(
    "launch",
    [
        RopeLaunch(max_heads_per_tile=1, num_warps=1, tokens_per_program=1),
        RopeLaunch(max_heads_per_tile=2, num_warps=2, tokens_per_program=3),  # 3 does not divide 2 x 5 tokens
        RopeLaunch(max_heads_per_tile=64, num_warps=4, tokens_per_program=4),
    ],
)
def test_every_launch_config_gives_the_same_rotation(launch):
    """Heads split over several tiles, tokens shared by programs (with a ragged last program): forward
    and backward, in place and into new buffers, all equal the default launch's result bit for bit."""
    gen = torch.Generator().manual_seed(6)
    q = _heads(2, 6, 5, 16, torch.float32, gen, "hf")
    k = _heads(2, 3, 5, 16, torch.float32, gen, "hf")
    cos, sin = _cos_sin(None, 5, 16, torch.float32, gen)
    cos3, sin3 = cos.unsqueeze(0), sin.unsqueeze(0)
    for backward in (False, True):
        expected = launch_rope(q, k, cos3, sin3, torch.empty_like(q), torch.empty_like(k), backward)
        got = launch_rope(q, k, cos3, sin3, torch.empty_like(q), torch.empty_like(k), backward, launch)
        q_in, k_in = q.clone(), k.clone()
        launch_rope(q_in, k_in, cos3, sin3, q_in, k_in, backward, launch)
        for e, g, i in zip(expected, got, (q_in, k_in)):
            assert torch.equal(e, g) and torch.equal(e, i)
    ref = reference_rope(q.double(), k.double(), cos.double(), sin.double())
    forward = launch_rope(q, k, cos3, sin3, torch.empty_like(q), torch.empty_like(k), False, launch)
    assert_close_to_reference(forward[0], ref[0], reference_rope(q, k, cos, sin)[0], torch.float32, name="q_rot")


def test_default_launch_at_llama_and_small_shapes():
    assert default_rope_launch(32, 8, 128) == RopeLaunch(max_heads_per_tile=8, num_warps=4, tokens_per_program=1)
    assert default_rope_launch(4, 2, 16).num_warps == 1  # a 4 x 8 tile: one warp
