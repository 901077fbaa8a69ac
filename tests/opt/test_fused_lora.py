"""Fused LoRA: the Functions against float64 math, and whole models against peft (CPU; gpu-marked at 8B shapes).

Tolerances: Function level, flash-attention's rule from tests/kernels/_tolerances.py (fused error vs a
float64 reference at most 2x plain PyTorch's in the same dtype + one ulp of slack). Model level on CPU
(float32 tiny models), every gradient within 2e-5 of peft's relative to its tensor's largest entry: the
two paths do the same float32 math in a different order, so only summation-order rounding separates them.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from optkit.opt.fused_lora import (
    FusedMLPForward,
    FusedProjectionForward,
    LoRAProjection,
    MLPGroup,
    ProjectionGroup,
    _FusedMLPFunction,
    _FusedProjectionsFunction,
    apply_fused_lora,
    gated_activation,
    remove_fused_lora,
)
from optkit.train.method import decoder_layers
from tests.kernels._tolerances import check_forward_backward
from tests.train._tiny import loss_and_grads, max_relative_error, one_thread, tiny_model, token_batch  # noqa: F401

FUSED_ON = OmegaConf.create({"fused_lora": True})
MODEL_RTOL = 2e-5


# ----------------------------------------------------------------------------- Function level
def _projection(weight, bias, A, B, scale):
    return LoRAProjection(SimpleNamespace(weight=weight, bias=bias), A, B, scale)


def reference_projection(x, weight, bias, A, B, scale):
    y = x @ weight.t() + (bias if bias is not None else 0)
    return y if A is None else y + scale * (x @ A.t()) @ B.t()


def _rand(gen, *shape, scale=1.0, grad=False):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).requires_grad_(grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_group_matches_float64(dtype):
    """Q with bias and LoRA, K without LoRA, V with a different rank: one Function, three outputs."""
    gen = torch.Generator().manual_seed(0)
    d_in, outs, ranks, scales = 24, (40, 8, 16), (3, 0, 5), (2.0, 0.0, 0.5)
    x = _rand(gen, 2, 5, d_in, grad=True)
    weights = [_rand(gen, o, d_in, scale=d_in**-0.5) for o in outs]
    bias_q = _rand(gen, outs[0])
    lora = [
        (_rand(gen, r, d_in, scale=0.3, grad=True), _rand(gen, o, r, scale=0.3, grad=True)) if r else (None, None)
        for o, r in zip(outs, ranks)
    ]
    params = [t for pair in lora for t in pair if t is not None]
    inputs = [x, *weights, bias_q, *params]
    inputs = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in inputs]

    def split(args):
        x, wq, wk, wv, bq, aq, bbq, av, bbv = args
        return x, [(wq, bq, aq, bbq, scales[0]), (wk, None, None, None, 0.0), (wv, None, av, bbv, scales[2])]

    def fused(*args):
        x, specs = split(args)
        group = ProjectionGroup(("q", "k", "v"), [_projection(*s) for s in specs])
        return _FusedProjectionsFunction.apply(x, group, True, *args[5:])

    def reference(*args):
        x, specs = split(args)
        return tuple(reference_projection(x, *s) for s in specs)

    check_forward_backward(fused, reference, inputs, dtype)


@pytest.mark.parametrize(
    "activation,dtype", [("silu", torch.float32), ("silu", torch.bfloat16), ("gelu_pytorch_tanh", torch.float32)]
)
def test_mlp_matches_float64(activation, dtype):
    gen = torch.Generator().manual_seed(1)
    hidden, inter, rank, scale = 24, 40, 4, 2.0
    x = _rand(gen, 2, 7, hidden, grad=True)
    w_gate, w_up = _rand(gen, inter, hidden, scale=hidden**-0.5), _rand(gen, inter, hidden, scale=hidden**-0.5)
    w_down = _rand(gen, hidden, inter, scale=inter**-0.5)
    lora = [
        _rand(gen, *s, scale=0.3, grad=True)
        for s in [(rank, hidden), (inter, rank), (rank, hidden), (inter, rank), (rank, inter), (hidden, rank)]
    ]
    inputs = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in [x, w_gate, w_up, w_down, *lora]]
    act = gated_activation(activation)
    torch_act = {
        "silu": lambda g, u: F.silu(g) * u,
        "gelu_pytorch_tanh": lambda g, u: F.gelu(g, approximate="tanh") * u,
    }[activation]

    def fused(x, wg, wu, wd, ag, bg, au, bu, ad, bd):
        group = MLPGroup(
            _projection(wg, None, ag, bg, scale),
            _projection(wu, None, au, bu, scale),
            _projection(wd, None, ad, bd, scale),
            act,
        )
        return _FusedMLPFunction.apply(x, group, True, False, ag, bg, au, bu, ad, bd)

    def reference(x, wg, wu, wd, ag, bg, au, bu, ad, bd):
        h = torch_act(
            reference_projection(x, wg, None, ag, bg, scale), reference_projection(x, wu, None, au, bu, scale)
        )
        return reference_projection(h, wd, None, ad, bd, scale)

    check_forward_backward(fused, reference, inputs, dtype)


# ----------------------------------------------------------------------------- model level vs peft
@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2", "tiny_qwen3", "tiny_gemma2"])
def test_gradients_match_peft(model, method):
    """qwen2: attention biases; qwen3: q_norm/k_norm after the fused QKV; gemma2: GeGLU (tanh)."""
    net, _ = tiny_model(model, method, "model.num_layers=1")
    ids = token_batch(0)
    peft_loss, peft_grads = loss_and_grads(net, ids)
    log = apply_fused_lora(net, FUSED_ON)
    assert log[0].startswith("fused_lora: QKV+O fused in 1/1 layers, MLP in 1/1"), log
    fused_loss, fused_grads = loss_and_grads(net, ids)
    torch.testing.assert_close(fused_loss, peft_loss, rtol=1e-6, atol=1e-6)
    assert max_relative_error(fused_grads, peft_grads) < MODEL_RTOL


@pytest.mark.parametrize("checkpointing", ["none", "standard", "offload", "offload_double_buffer"])
def test_adapter_updates_reach_the_next_step(checkpointing):
    """The adapters' dtype casts are cached from forward to backward; every kind of update must still be
    seen by the next step: an optimizer step (bumps version counters), writes through ``.data`` (do not,
    like bitsandbytes' 8-bit optimizers), and a no-grad forward in between (evaluation)."""
    from optkit.train.checkpointing import enable_checkpointing

    net, _ = tiny_model("tiny_llama", "qlora", "model.num_layers=2")
    fused = copy.deepcopy(net)
    apply_fused_lora(fused, FUSED_ON)
    for model in (net, fused):
        enable_checkpointing(model, checkpointing)
        model.train()
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (net, fused)]

    def step(model, optimizer, ids):
        loss, grads = loss_and_grads(model, ids)
        optimizer.step()
        return loss, grads

    def data_write(model):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.data.mul_(1.5)

    for i in range(3):
        (peft_loss, peft_grads), (fused_loss, fused_grads) = (
            step(m, o, token_batch(i)) for m, o in zip((net, fused), optimizers)
        )
        torch.testing.assert_close(fused_loss, peft_loss, rtol=1e-5, atol=1e-6)
        assert max_relative_error(fused_grads, peft_grads) < 1e-4
        for model in (net, fused):
            if i == 1:
                data_write(model)
            if i == 2:
                with torch.no_grad():
                    model(input_ids=token_batch(9), use_cache=False)
                data_write(model)
    after_eval = [loss_and_grads(m, token_batch(6))[0] for m in (net, fused)]  # no-grad forward, write, step
    torch.testing.assert_close(after_eval[1], after_eval[0], rtol=1e-5, atol=1e-6)
    for model in (net, fused):  # backward, then a write with no step (no version bump) in between
        data_write(model)
    losses = [loss_and_grads(m, token_batch(5))[0] for m in (net, fused)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def test_saves_less_than_peft_and_never_a_base_weight():
    """The fused MLP and attention keep no (dequantized) weight from forward to backward."""
    net, _ = tiny_model("tiny_llama", "qlora", "model.num_layers=1")
    weight_shapes = {tuple(p.quant_state.shape) for p in net.parameters() if hasattr(p, "quant_state")}
    layer = decoder_layers(net)[0]
    attn = layer.self_attn
    x = torch.randn(1, 40, 64)  # 40 tokens: no activation shares a shape with a weight

    def saved_bytes_and_shapes():
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer.mlp(x)
            q, _, _ = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            attn.o_proj(q)
        return sum(t.numel() * t.element_size() for t in saved), {tuple(t.shape) for t in saved}

    peft_bytes, _ = saved_bytes_and_shapes()
    apply_fused_lora(net, FUSED_ON)
    fused_bytes, fused_shapes = saved_bytes_and_shapes()
    assert weight_shapes and not (fused_shapes & weight_shapes), fused_shapes & weight_shapes
    assert fused_bytes < peft_bytes, (fused_bytes, peft_bytes)


def test_remove_restores_peft_and_state_dict_is_unchanged():
    net, _ = tiny_model("tiny_qwen3", "lora", "model.num_layers=1")
    ids = token_batch(3)
    before = copy.deepcopy(net.state_dict())
    peft_loss, _ = loss_and_grads(net, ids)
    apply_fused_lora(net, FUSED_ON)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_fused_lora(net, FUSED_ON)
    layer = decoder_layers(net)[0]
    shared = layer.self_attn.q_proj.forward.shared
    loss_and_grads(net, ids)
    assert shared._input is None and not shared._pending  # Q, K and V each took their output
    assert remove_fused_lora(net) == 5  # q, k, v, o and the MLP
    assert not any(
        isinstance(m.__dict__.get("forward"), (FusedMLPForward, FusedProjectionForward)) for m in net.modules()
    )
    assert torch.equal(loss_and_grads(net, ids)[0], peft_loss)


def test_optkit_patch_records_the_forwards_and_unpatch_removes_them():
    from optkit.opt.patcher import patch, patch_log, unpatch

    net, _ = tiny_model("tiny_llama", "lora", "model.num_layers=1")
    patch(net, {"fused_lora": True})
    assert patch_log(net)[0].startswith("fused_lora: QKV+O fused in 1/1 layers, MLP in 1/1"), patch_log(net)
    unpatch(net)
    assert not any(
        isinstance(m.__dict__.get("forward"), (FusedMLPForward, FusedProjectionForward)) for m in net.modules()
    )


def test_dropout_falls_back_to_peft_with_a_note():
    net, _ = tiny_model("tiny_llama", "lora", "model.num_layers=1", "train.lora_dropout=0.1")
    log = apply_fused_lora(net, FUSED_ON)
    assert "fused in 0/1 layers, MLP in 0/1" in log[0]
    assert any("lora_dropout=0.1" in line for line in log[1:]), log
    assert remove_fused_lora(net) == 0


def test_full_finetuning_is_left_alone_and_off_means_off():
    net, _ = tiny_model("tiny_llama", "full", "model.num_layers=1")
    log = apply_fused_lora(net, FUSED_ON)
    assert "0/1" in log[0] and any("base weight trains" in line for line in log)
    assert apply_fused_lora(net, OmegaConf.create({"fused_lora": False})) == []


def test_fused_qlora_projections_compile_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the fused Function, NF4 dequantize included, and matches eager."""
    from optkit.train.qlora import to_linear4bit

    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    bases = [to_linear4bit(torch.nn.Linear(64, out, bias=False)) for out in (64, 32, 32)]
    lora = [
        (torch.randn(4, 64, generator=gen).requires_grad_(), torch.randn(out, 4, generator=gen).requires_grad_())
        for out in (64, 32, 32)
    ]
    group = ProjectionGroup(("q", "k", "v"), [LoRAProjection(b, A, B, 2.0) for b, (A, B) in zip(bases, lora)])
    params = [t for pair in lora for t in pair]
    x = torch.randn(2, 8, 64, generator=gen, requires_grad=True)

    def loss(x, *params):
        return sum((y * y).sum() for y in _FusedProjectionsFunction.apply(x, group, True, *params))

    inputs = [x, *params]
    eager_loss = loss(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))  # with the Function's forward/backward bodies
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled_loss = torch.compile(loss, backend=recording_backend, fullgraph=True)(*inputs)
    grads = torch.autograd.grad(compiled_loss, inputs)
    assert "nf4_dequantize" in "".join(graphs)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


# ----------------------------------------------------------------------------- bf16 accuracy (CPU tiny, GPU 8B)
def _dequantized_fp32_twin(net):
    """A float32 copy of a (Q)LoRA model whose 4-bit bases are nn.Linear holding the dequantized weights:
    the exact function the quantized model computes, evaluated in float32 (the reference)."""
    import bitsandbytes as bnb

    twin = copy.deepcopy(net)
    for module in list(twin.modules()):
        base = getattr(module, "base_layer", None)
        if isinstance(base, bnb.nn.Linear4bit):
            linear = torch.nn.Linear(
                base.in_features, base.out_features, bias=base.bias is not None, device=base.weight.device
            )
            linear.weight.data = bnb.functional.dequantize_4bit(base.weight, base.weight.quant_state).float()
            if base.bias is not None:
                linear.bias.data = base.bias.data.float()
            module.base_layer = linear.requires_grad_(False)
    return twin.float()


def _bf16_errors_against_fp32(net, ids):
    """(peft's, fused's) max relative gradient error and (peft's, fused's) loss error vs the fp32 twin."""
    reference_loss, reference = loss_and_grads(_dequantized_fp32_twin(net), ids)
    peft_loss, peft_grads = loss_and_grads(net, ids)
    apply_fused_lora(net, FUSED_ON)
    fused_loss, fused_grads = loss_and_grads(net, ids)
    return (
        (max_relative_error(peft_grads, reference), max_relative_error(fused_grads, reference)),
        (abs(peft_loss.float() - reference_loss).item(), abs(fused_loss.float() - reference_loss).item()),
    )


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_bf16_gradients_as_accurate_as_peft(method):
    """bf16: fused LoRA math runs in bf16 where peft upcasts to its float32 adapters; against a float32
    evaluation of the same (dequantized) model, fused's error stays within 2x peft's + 1e-2."""
    net, _ = tiny_model("tiny_llama", method, "model.num_layers=1", "model.dtype=bfloat16")
    (peft_err, fused_err), (peft_loss_err, fused_loss_err) = _bf16_errors_against_fp32(net, token_batch(5))
    assert fused_err <= 2 * peft_err + 1e-2, (fused_err, peft_err)
    assert fused_loss_err <= 2 * peft_loss_err + 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_gradients_match_peft_llama3_8b_gpu(method):
    """Llama-3-8B shapes cut to 2 layers, bf16, 2 x 1024 tokens: fused and peft gradients are both held
    against a float32 evaluation of the same model; fused's error may be at most 2x peft's + 1e-2."""
    net, _ = tiny_model("llama3_8b", method, "model.num_layers=2", "model.dtype=bfloat16", device="cuda")
    ids = torch.randint(0, 128256, (2, 1024), device="cuda")
    (peft_err, fused_err), (peft_loss_err, fused_loss_err) = _bf16_errors_against_fp32(net, ids)
    assert fused_err <= 2 * peft_err + 1e-2, (fused_err, peft_err)
    assert fused_loss_err <= 2 * peft_loss_err + 1e-2
