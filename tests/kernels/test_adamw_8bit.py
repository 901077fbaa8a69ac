"""The 8-bit AdamW kernel (one launch for every tensor) against its float64 reference, per tensor.

Tolerances, derived once:
- Parameters: the kernel computes in fp32 and rounds once to the parameter dtype; the reference is
  float64. Bound per element: ``PARAM_RTOL[dtype] x |ref|`` (two fp32 ulps; one fp16 ulp; one bf16 ulp,
  because Triton's CPU interpreter truncates fp32 -> bf16) + ``1e-5 x |ref - start|`` (fp32 error of the
  update itself, a few ulps of it, scaled by its own size).
- Codes: equal to the reference's nearest map entry, except where the float64 normalized moment lies
  within ``TIE_WINDOW`` (fp32 error of m / absmax: a few ulps of values <= 1) of the midpoint between two
  entries; there the neighbour is as right.
- Stored moments (the derived quantization bound): code x absmax is within half the local map step x the
  block's absmax (+ the tie window) of the float64 moment.
"""

from __future__ import annotations

import pytest
import torch

from optkit.kernels.adamw_8bit import (
    BLOCK,
    FusedAdamW8bit,
    dynamic_map,
    reference_adamw_8bit,
    reference_quantize,
    zero_code,
)
from tests.kernels._tolerances import DEVICE

LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8
SHAPES = [(1,), (255,), (257,), (4097,), (33, 65)]
PARAM_RTOL = {torch.float32: 2.4e-7, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
UPDATE_RTOL = 1e-5
TIE_WINDOW = 2e-6


def _params(dtype, seed, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=DEVICE, dtype=dtype)) for s in shapes]


def _grads(params, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=gen) * scale).to(device=DEVICE, dtype=p.dtype) for p in params]


def _snapshot(opt, params):
    """Each parameter and its state, copied to the CPU (where the reference runs and checks compare)."""
    return [
        (p.detach().to("cpu", copy=True), {k: v.to("cpu", copy=True) for k, v in opt.state[p].items()}) for p in params
    ]


def _group_settings(opt, param):
    group = next(g for g in opt.param_groups if any(q is param for q in g["params"]))
    return {"lr": group["lr"], "betas": group["betas"], "eps": group["eps"], "weight_decay": group["weight_decay"]}


def _check_params(out, ref64, start, dtype, name):
    bound = PARAM_RTOL[dtype] * ref64.abs() + UPDATE_RTOL * (ref64 - start.double()).abs()
    excess = (out.double() - ref64).abs() - bound
    assert excess.max().item() <= 0, f"{name}: parameter off by {excess.max().item():.3e} beyond its bound"


def _check_codes(codes, ref_codes, ref_exact, ref_absmax, signed, name):
    table = dynamic_map(signed).double()
    n_blocks = ref_absmax.numel()
    unit = (ref_exact.view(n_blocks, BLOCK) / ref_absmax.double().clamp_min(1e-300)[:, None]).view(-1)
    ours, theirs = codes.long(), ref_codes.long()
    differ = ours != theirs
    assert ((ours - theirs).abs() <= 1).all(), f"{name}: a code is more than one map entry off"
    midpoint = (table[ours[differ]] + table[theirs[differ]]) / 2
    assert ((unit[differ] - midpoint).abs() <= TIE_WINDOW).all(), f"{name}: a code differs away from a tie"


def _check_moment_bound(codes, absmax, ref_exact, ref_absmax, signed, name):
    """|code x absmax - exact| <= (half the map step at the value + tie window) x the block's absmax."""
    table = dynamic_map(signed).double()
    n_blocks = absmax.numel()
    scale = ref_absmax.double()[:, None]
    exact = ref_exact.view(n_blocks, BLOCK)
    unit = (exact / scale.clamp_min(1e-300)).clamp(table[0].item(), 1.0)
    below = (torch.searchsorted(table, unit.contiguous(), right=True) - 1).clamp(0, 254)
    half_step = (table[below + 1] - table[below]) / 2
    stored = table[codes.long()].view(n_blocks, BLOCK) * absmax.double()[:, None]
    excess = (stored - exact).abs() - (half_step + TIE_WINDOW) * scale
    assert excess.max().item() <= 1e-12, f"{name}: stored moment outside the quantization bound"


def _step_and_compare(opt, params, grads, dtype):
    """One optimizer step against the reference run from the state it started from, tensor by tensor."""
    before = _snapshot(opt, params)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    for (start, state), (out, live), p, g in zip(before, _snapshot(opt, params), params, grads):
        name = f"{tuple(p.shape)} {dtype}"
        if g is None:  # skipped: nothing moves, the step count stays
            assert torch.equal(out, start) and all(torch.equal(live[k], state[k]) for k in state), name
            continue
        ref, new = reference_adamw_8bit(start, g.cpu(), state, **_group_settings(opt, p))
        _check_params(out, ref, start, dtype, name)
        assert live["step"].item() == new["step"].item(), name
        for moment, signed in (("m", True), ("v", False)):
            codes, absmax = live[f"{moment}_codes"], live[f"{moment}_absmax"]
            torch.testing.assert_close(absmax, new[f"{moment}_absmax"], rtol=1e-6, atol=0)
            _check_codes(codes, new[f"{moment}_codes"], new[moment], new[f"{moment}_absmax"], signed, name)
            _check_moment_bound(codes, absmax, new[moment], new[f"{moment}_absmax"], signed, name)


def test_maps_are_the_dynamic_tree_maps():
    for signed, bands in ((True, 7), (False, 8)):
        table = dynamic_map(signed)
        assert table.numel() == 256 and bool((table[1:] > table[:-1]).all())
        assert table[-1] == 1.0 and table[0] == (-1.0 if signed else 0.0)
        assert dynamic_map(signed)[zero_code(signed)] == 0
        positive = table[table > 0].double()
        for e in range(bands):  # band e: 2^(bands-1-e) entries in (0.1, 1] x 10^-e, evenly spaced
            band = positive[(positive > 0.1 * 10.0**-e * (1 + 1e-6)) & (positive <= 10.0**-e * (1 + 1e-6))]
            assert band.numel() == 2 ** (bands - 1 - e), (signed, e)
            gaps = band.diff()
            assert gaps.numel() == 0 or torch.allclose(gaps, gaps[0].expand_as(gaps), rtol=1e-5)


def test_reference_quantize_is_the_nearest_entry_with_ties_low():
    table = dynamic_map(True)
    gen = torch.Generator().manual_seed(0)
    midpoints = (table[1:].double() + table[:-1].double()) / 2
    x = torch.cat([torch.rand(5000, generator=gen, dtype=torch.float64) * 2 - 1, midpoints, table.double()])
    brute = (x[:, None] - table.double()[None, :]).abs().argmin(dim=1)  # first minimum: the lower index
    assert torch.equal(reference_quantize(x, table).long(), brute)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_one_step_matches_reference(dtype, weight_decay):
    params = _params(dtype, seed=1)
    opt = FusedAdamW8bit(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    _step_and_compare(opt, params, _grads(params, seed=2), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_on_llama_lora_adapter_shapes_gpu(dtype):
    """The compiled kernel (the tests above run it on CUDA too, but a `-m gpu` pass selects only this one):
    Llama-3-8B r=16 adapter shapes, A (16, in) and B (out, 16), three steps, each against the reference."""
    shapes = [(16, 4096), (4096, 16), (16, 4096), (1024, 16), (16, 14336), (14336, 16), (16, 4096), (4096, 16)]
    params = _params(dtype, seed=11, shapes=shapes)
    assert params[0].is_cuda
    opt = FusedAdamW8bit(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.01)
    for step in range(3):
        _step_and_compare(opt, params, _grads(params, seed=20 + step, scale=1e-3), dtype)


def test_several_steps_with_a_schedule_zero_and_missing_grads_and_two_groups():
    """Every step checked from the state the kernel left: lr changes between steps, one tensor gets an
    all-zero gradient, one none at all; a weight-decay group and a no-decay group share the launch."""
    params = _params(torch.float32, seed=3)
    decay, no_decay = params[3:], params[:3]
    opt = FusedAdamW8bit(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS
    )
    lrs = [LR, 3e-3, 1e-3, 5e-3]
    for step, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        grads = _grads(params, seed=10 + step, scale=10.0**-step)  # moments span decades: several map bands
        if step == 2:
            grads[1] = torch.zeros_like(grads[1])
            grads[4] = None
        _step_and_compare(opt, params, grads, torch.float32)
    assert opt.state[params[4]]["step"].item() == len(lrs) - 1


def test_mixed_dtypes_step_one_launch_each():
    params = _params(torch.float32, seed=4, shapes=[(300,), (17, 19)]) + _params(
        torch.bfloat16, seed=5, shapes=[(513,)]
    )
    opt = FusedAdamW8bit(params, lr=LR, weight_decay=0.0)
    assert len(opt._buckets) == 2
    for step in range(2):
        grads = _grads(params, seed=20 + step)
        before = _snapshot(opt, params)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for (start, state), p, g in zip(before, params, grads):
            ref, _ = reference_adamw_8bit(start, g.cpu(), state, **_group_settings(opt, p))
            _check_params(p.detach().cpu(), ref, start, p.dtype, str(p.dtype))


def test_all_zero_gradients_leave_only_weight_decay():
    params = _params(torch.float32, seed=6, shapes=[(257,)])
    start = params[0].detach().clone()
    opt = FusedAdamW8bit(params, lr=LR, weight_decay=0.1)
    params[0].grad = torch.zeros(257, device=DEVICE)
    opt.step()
    torch.testing.assert_close(params[0].detach(), start * (1 - LR * 0.1), rtol=2.4e-7, atol=0)
    state = opt.state[params[0]]
    assert (state["m_absmax"] == 0).all() and (state["v_absmax"] == 0).all()
    assert (state["m_codes"] == zero_code(True)).all() and (state["v_codes"] == zero_code(False)).all()


def test_free_running_trajectory_follows_the_reference():
    """Kernel and reference each keep their own quantized state for 6 steps. They quantize alike except
    at ties, where one element's moment moves by one map step: the parameters agree to the per-step bound
    (times the steps) on >= 99.9% of elements, and to 1e-3 of the displacement in norm."""
    params = _params(torch.float32, seed=7)
    opt = FusedAdamW8bit(params, lr=LR, weight_decay=0.05)
    starts, ref_states = map(list, zip(*_snapshot(opt, params)))
    ref_params = [s.double() for s in starts]
    steps = 6
    for step in range(steps):
        grads = _grads(params, seed=30 + step)
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = g
            ref_params[i], ref_states[i] = reference_adamw_8bit(
                ref_params[i], g.cpu(), ref_states[i], **_group_settings(opt, p)
            )
        opt.step()
    out = torch.cat([p.detach().cpu().double().view(-1) for p in params])
    ref = torch.cat([r.view(-1) for r in ref_params])
    start = torch.cat([s.double().view(-1) for s in starts])
    bound = steps * (PARAM_RTOL[torch.float32] * ref.abs() + UPDATE_RTOL * (ref - start).abs())
    assert ((out - ref).abs() > bound).double().mean().item() <= 1e-3
    assert (out - ref).norm().item() <= 1e-3 * (ref - start).norm().item()
