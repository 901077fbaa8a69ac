"""opt.tiled_mlp: the MLP over token chunks equals the plain MLP (forward and every gradient, float64 and
bf16, chunk sizes that do not divide the tokens), replays dropout's RNG in its recomputation, saves only
its input, and composes with the patcher (fused LoRA's forward, unpatch)."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from optkit.config.compose import compose
from optkit.models import build_model
from optkit.opt.patcher import patch, patch_log, unpatch
from optkit.opt.tiled_mlp import TiledForward, _TiledMLPFunction, reference_mlp, tiled_mlp
from optkit.train.method import apply_training_method, decoder_layers

HIDDEN, INTERMEDIATE = 48, 160
BATCH, SEQ = 3, 37  # 111 tokens: no chunk size below divides them evenly except 1 and 37


def _mlp(dtype, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        hidden_act="silu",
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    mlp = LlamaMLP(config).to(dtype)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.2)
    return mlp


def _grads(mlp, x, run):
    x = x.detach().clone().requires_grad_(True)
    mlp.zero_grad(set_to_none=True)
    out = run(mlp, x)
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    (out * weight).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in mlp.named_parameters()}


def _plain(mlp, x):
    return reference_mlp(x, mlp.forward)


def _tiled(chunk):
    return lambda mlp, x: tiled_mlp(x, mlp.forward, chunk, [p for p in mlp.parameters() if p.requires_grad])


@pytest.mark.parametrize("chunk", [1, 7, 16, 110, 111, 500])
def test_float64_forward_and_every_gradient_match_the_plain_mlp(chunk):
    mlp = _mlp(torch.float64)
    x = torch.randn(BATCH, SEQ, HIDDEN, dtype=torch.float64)
    ref_out, ref_dx, ref_dp = _grads(mlp, x, _plain)
    out, dx, dp = _grads(mlp, x, _tiled(chunk))
    scale = ref_out.abs().max()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(dx, ref_dx, rtol=0, atol=1e-12 * ref_dx.abs().max())
    for name in ref_dp:
        torch.testing.assert_close(dp[name], ref_dp[name], rtol=0, atol=1e-12 * ref_dp[name].abs().max(), msg=name)


@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_bf16_errors_against_float64_are_those_of_the_plain_mlp(chunk):
    """bf16, tiled or not, vs the float64 MLP on the same (upcast) values: tiling adds no error beyond bf16's
    own (parameter gradients are summed over chunks in float32)."""
    mlp16 = _mlp(torch.bfloat16, seed=1)
    mlp64 = _mlp(torch.float64, seed=1)
    mlp64.load_state_dict({k: v.double() for k, v in mlp16.state_dict().items()})
    x16 = torch.randn(BATCH, SEQ, HIDDEN).to(torch.bfloat16)
    ref = _grads(mlp64, x16.double(), _plain)
    plain = _grads(mlp16, x16, _plain)
    tiled = _grads(mlp16, x16, _tiled(chunk))

    def err(result, i, name=None):
        got, want = (result[i], ref[i]) if name is None else (result[i][name], ref[i][name])
        return ((got.double() - want).abs().max() / want.abs().max()).item()

    for i, name in [(0, None), (1, None)] + [(2, n) for n in ref[2]]:
        plain_err, tiled_err = err(plain, i, name), err(tiled, i, name)
        assert tiled_err <= 2 * plain_err + 2**-8, (i, name, plain_err, tiled_err)


def test_recomputed_dropout_draws_the_forward_masks():
    """LoRA-style dropout inside the MLP: the gradient is that of the function forward computed (chunks in
    the same order, same RNG), which holds only if backward replays the RNG state."""
    mlp = _mlp(torch.float64)
    drop = torch.nn.Dropout(0.5)

    def forward(x):
        return mlp(drop(x))

    x = torch.randn(BATCH, SEQ, HIDDEN, dtype=torch.float64)
    params = list(mlp.parameters())
    torch.manual_seed(3)
    xt = x.clone().requires_grad_(True)
    out = tiled_mlp(xt, forward, 16, params)
    torch.manual_seed(99)  # the RNG moves on before backward, as the rest of a step would move it
    out.sum().backward()
    torch.manual_seed(3)  # the same function without tiling's Function: the chunks in the same order
    xr = x.clone().requires_grad_(True)
    flat = xr.reshape(1, -1, HIDDEN)
    ref = torch.cat([forward(flat[:, s : s + 16]) for s in range(0, flat.shape[1], 16)], dim=1)
    torch.testing.assert_close(out.reshape(ref.shape), ref, rtol=0, atol=0)
    ref_dx = torch.autograd.grad(ref.sum(), xr)[0]
    torch.testing.assert_close(xt.grad, ref_dx, rtol=0, atol=1e-12)


def _saved_bytes(run):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    mlp = _mlp(torch.float32)
    x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(mlp, x)
    out.sum().backward()
    return sum(total), x.numel() * x.element_size()


def test_tiled_mlp_saves_only_its_input():
    plain, x_bytes = _saved_bytes(_plain)
    tiled, _ = _saved_bytes(_tiled(16))
    intermediate = BATCH * SEQ * INTERMEDIATE * 4
    assert plain >= 3 * intermediate, plain  # gate, up and their activation for every token
    assert tiled == x_bytes, (tiled, x_bytes)


def test_at_most_one_chunk_calls_the_mlp_directly():
    mlp = _mlp(torch.float32)
    x = torch.randn(1, 8, HIDDEN, requires_grad=True)
    out = tiled_mlp(x, mlp.forward, 8, list(mlp.parameters()))
    assert "TiledMLP" not in type(out.grad_fn).__name__
    out = tiled_mlp(x, mlp.forward, 7, list(mlp.parameters()))
    assert type(out.grad_fn).__name__ == _TiledMLPFunction.__name__ + "Backward"


def _lora_model(*overrides):
    cfg = compose(["model=tiny_llama", "train=lora", *overrides])
    model = apply_training_method(build_model(cfg.model, "cpu", seed=0), cfg.train)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_patched_lora_model_trains_as_the_plain_one_and_unpatches():
    model = _lora_model()
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    patch(model, compose(["opt=baseline", "opt.tiled_mlp=true", "opt.tiled_mlp_chunk_tokens=5"]).opt)
    mlps = [layer.mlp for layer in decoder_layers(model)]
    assert all(isinstance(m.__dict__.get("forward"), TiledForward) for m in mlps)
    assert any("tiled_mlp: MLP over chunks of 5 tokens" in line for line in patch_log(model))
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    unpatch(model)
    assert not any("forward" in m.__dict__ for m in mlps)


def test_tiling_wraps_fused_loras_mlp_forward_and_unpatch_restores_both():
    model = _lora_model()
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    patch(
        model,
        compose(["opt=baseline", "opt.fused_lora=true", "opt.tiled_mlp=true", "opt.tiled_mlp_chunk_tokens=6"]).opt,
    )
    mlp = decoder_layers(model)[0].mlp
    fused = mlp.__dict__["forward"].forward
    assert type(fused).__name__ == "FusedMLPForward"
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    unpatch(model)
    assert "forward" not in mlp.__dict__


def test_moe_models_are_left_alone():
    model = build_model(compose(["model=tiny_qwen3_moe"]).model, "cpu", seed=0)
    patch(model, compose(["opt=baseline", "opt.tiled_mlp=true"]).opt)
    assert any("tiled_mlp: skipped" in line for line in patch_log(model))
