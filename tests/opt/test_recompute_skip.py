"""opt.recompute_skips_mlp_down: a checkpoint recompute skips the fused MLP's down_proj, and nothing changes.

Tolerances. On vs off: the skipping recompute computes what backward saves (x, gate, up, x A^T, h A^T) with
the very kernels of the full one, so every gradient and the loss are equal bit for bit, in float32 and in
bfloat16 (CPU, one thread). Against float64 (a float64 twin of the model, QLoRA's bases dequantized, no
checkpointing, peft's own path): each gradient within 2e-5 of its tensor's largest entry (float32, as
tests/opt/test_fused_lora.py holds fused LoRA to peft), the Function's gradients to the kernel tests' rule
(tests/kernels/_tolerances.py). A down weight read counter tells a skip from none: 3 reads per layer and
step without the skip (forward, recompute, backward dx), 2 with it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from optkit.families import get_family
from optkit.opt import recompute_skip
from optkit.opt.fused_lora import LoRAProjection, MLPGroup, _FusedMLPFunction, gated_activation
from optkit.opt.patcher import patch, patch_log, unpatch
from optkit.opt.recompute_skip import NAME, skipped_params_per_token
from optkit.train.checkpointing import disable_checkpointing, enable_checkpointing
from optkit.train.method import decoder_layers
from optkit.train.recompute import checkpoint_contexts, in_layer_recompute, layer_recompute
from tests.kernels._tolerances import assert_close_to_reference
from tests.train._tiny import loss_and_grads, max_relative_error, one_thread, tiny_model, token_batch  # noqa: F401

MODES = ("standard", "offload", "offload_double_buffer")
FLOAT64_RTOL = 2e-5
READS_WITHOUT_SKIP, READS_WITH_SKIP = 3, 2


@pytest.fixture(autouse=True)
def nan_filled_empty():
    """torch.empty gives NaN (deterministic mode fills uninitialized memory): a skipped output that anything
    reads turns gradients NaN, instead of possibly holding a stale copy of the right values."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: cuBLAS would refuse without a workspace env
    assert torch.utils.deterministic.fill_uninitialized_memory and torch.empty(4).isnan().all()
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _opt(on: bool, **extra):
    return {"fused_lora": True, NAME: on, **extra}


def _count_down_weight_reads(net) -> list:
    """[reads] of every layer's down_proj base weight (a QLoRA weight is dequantized on each read)."""
    reads = [0]
    for layer in decoder_layers(net):
        projection = layer.mlp.forward.group.down[0]
        weight = projection.weight

        def counting(dtype, weight=weight):
            reads[0] += 1
            return weight(dtype)

        projection.weight = counting
    return reads


def _step(net, mode, batches=(token_batch(100), token_batch(0))):
    """(loss, grads, down weight reads per layer) of the second of two steps under checkpointing ``mode``."""
    reads = _count_down_weight_reads(net)
    enable_checkpointing(net, mode)
    try:
        loss_and_grads(net, batches[0])
        reads[0] = 0
        loss, grads = loss_and_grads(net, batches[1])
    finally:
        disable_checkpointing(net)
    return loss, grads, reads[0] / len(decoder_layers(net))


def _float64_twin(net):
    """The function the (Q)LoRA model computes, in float64: 4-bit bases become nn.Linear of their dequantized
    weights. Runs peft's path, without checkpointing."""
    import bitsandbytes as bnb

    twin = copy.deepcopy(net)
    for module in list(twin.modules()):
        base = getattr(module, "base_layer", None)
        if isinstance(base, bnb.nn.Linear4bit):
            linear = torch.nn.Linear(base.in_features, base.out_features, bias=False)
            linear.weight.data = bnb.functional.dequantize_4bit(base.weight, base.weight.quant_state).float()
            module.base_layer = linear.requires_grad_(False)
    return twin.double()


def _on_and_off(model, method, mode, *overrides):
    net, _ = tiny_model(model, method, "model.num_layers=2", *overrides)
    nets = {on: patch(copy.deepcopy(net), _opt(on)) for on in (False, True)}
    return net, {on: _step(nets[on], mode) for on in (False, True)}


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen3"])
@pytest.mark.parametrize("mode", MODES)
def test_gradients_equal_without_the_skip_and_float64(mode, model, method):
    net, results = _on_and_off(model, method, mode)
    (off_loss, off_grads, off_reads), (on_loss, on_grads, on_reads) = results[False], results[True]
    assert (off_reads, on_reads) == (READS_WITHOUT_SKIP, READS_WITH_SKIP)
    assert torch.equal(on_loss, off_loss)
    for name, grad in off_grads.items():
        assert torch.equal(on_grads[name], grad), name
    twin = _float64_twin(net)
    ref_loss, ref_grads = loss_and_grads(twin, token_batch(0))
    torch.testing.assert_close(on_loss.double(), ref_loss.double(), rtol=1e-6, atol=1e-6)  # HF takes the loss in fp32
    assert max_relative_error(on_grads, ref_grads) < FLOAT64_RTOL


def test_bfloat16_gradients_equal_without_the_skip():
    _, results = _on_and_off("tiny_llama", "lora", "standard", "model.dtype=bfloat16")
    assert results[True][2] == READS_WITH_SKIP
    assert torch.equal(results[True][0], results[False][0])
    for name, grad in results[False][1].items():
        assert torch.equal(results[True][1][name], grad), name


@pytest.mark.parametrize("early_stop", [True, False])
def test_standard_checkpointing_with_and_without_early_stop(early_stop):
    """Early stop ends the recompute inside the MLP's save (the mark must still be cleared); without it the
    recompute runs on through the residual add with the unread output."""
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        _, results = _on_and_off("tiny_llama", "lora", "standard")
    assert results[True][2] == READS_WITH_SKIP and not in_layer_recompute()
    for name, grad in results[False][1].items():
        assert torch.equal(results[True][1][name], grad), name


def test_a_graph_backwarded_twice_recomputes_twice():
    """retain_graph=True: the second backward recomputes again, entering the same recompute context twice;
    the gradients are twice one backward's, with and without the skip."""
    net, _ = tiny_model("tiny_llama", "lora", "model.num_layers=2")
    ids = token_batch(0)
    results = {}
    for on in (False, True):
        patched = patch(copy.deepcopy(net), _opt(on))
        reads = _count_down_weight_reads(patched)
        enable_checkpointing(patched, "standard")
        _, once = loss_and_grads(patched, ids)
        patched.zero_grad(set_to_none=True)
        reads[0] = 0
        loss = patched(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward(retain_graph=True)
        loss.backward()
        twice = {n: p.grad.clone() for n, p in patched.named_parameters() if p.requires_grad}
        results[on] = (once, twice, reads[0] / len(decoder_layers(patched)))
    # forward 1 + per backward (recompute + dx): 1 + 2 x 2 without the skip, 1 + 2 x 1 with it
    assert (results[False][2], results[True][2]) == (5, 3) and not in_layer_recompute()
    for name, grad in results[False][1].items():
        assert torch.equal(results[True][1][name], grad), name
        torch.testing.assert_close(grad, 2 * results[False][0][name], rtol=1e-5, atol=1e-7)


def test_hf_checkpointing_enabled_after_patching_is_marked_unless_reentrant():
    """Trainer's path: optkit.patch, then the model's own gradient_checkpointing_enable."""
    net, _ = tiny_model("tiny_llama", "lora", "model.num_layers=2")
    off_loss, off_grads = loss_and_grads(patch(copy.deepcopy(net), _opt(False)), token_batch(0))
    patch(net, _opt(True))
    reads = _count_down_weight_reads(net)
    for reentrant, expected in ((False, READS_WITH_SKIP), (True, READS_WITHOUT_SKIP)):
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            net.enable_input_require_grads()  # reentrant checkpoint needs an input that requires grad
        reads[0] = 0
        loss, grads = loss_and_grads(net, token_batch(0))
        assert reads[0] == expected * 2, f"use_reentrant={reentrant}"
        torch.testing.assert_close(loss, off_loss, rtol=1e-6, atol=1e-6)
        assert max_relative_error(grads, off_grads) < 1e-6
    assert any("reentrant" in line for line in patch_log(net)), patch_log(net)
    net.gradient_checkpointing_disable()
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_and_grads(net, token_batch(0))
    unpatch(net)
    for layer in decoder_layers(net):
        assert "context_fn" not in layer._gradient_checkpointing_func.keywords
        assert not layer._forward_pre_hooks


def test_gemma2_reads_its_mlp_output_and_never_skips():
    """Gemma 2 normalizes the MLP output (post_feedforward_layernorm saves it): not on the allowlist."""
    net, results = _on_and_off("tiny_gemma2", "lora", "standard")
    assert results[True][2] == READS_WITHOUT_SKIP
    patched = patch(copy.deepcopy(net), _opt(True))
    assert any(line.startswith(f"{NAME}: skipped") for line in patch_log(patched)), patch_log(patched)
    from optkit.opt.recompute_skip import apply_recompute_skip  # the family fact, asked without the registry

    assert apply_recompute_skip(patched, SimpleNamespace(compile=False))[0].startswith("skipped (gemma2")
    for name, grad in results[False][1].items():
        assert torch.equal(results[True][1][name], grad), name


@pytest.mark.parametrize("mode", ["standard", "offload"])
def test_gemma2_on_the_allowlist_is_caught(monkeypatch, mode):
    """Mutation: Gemma 2 put on the allowlist. Its recompute then skips (2 reads) and its post-FFN norm saves
    the unread output (NaN here): the gradient check above must fail."""
    net, _ = tiny_model("tiny_gemma2", "lora", "model.num_layers=2")
    _, off_grads, _ = _step(patch(copy.deepcopy(net), _opt(False)), mode)
    listed = dataclasses.replace(get_family("gemma2"), mlp_output_only_in_residual=True)
    monkeypatch.setattr(recompute_skip, "get_family", lambda name: listed)
    forced = patch(net, _opt(False))
    assert recompute_skip.apply_recompute_skip(forced, SimpleNamespace(compile=False))[0].startswith("down_proj")
    _, grads, reads = _step(forced, mode)
    assert reads == READS_WITH_SKIP
    assert not max_relative_error(grads, off_grads) <= FLOAT64_RTOL  # NaN or far off


def test_a_skip_outside_the_recompute_is_caught():
    """Mutation: the mark not asked (the skip in the forward too): the loss reads the unread output."""
    net, _ = tiny_model("tiny_llama", "lora", "model.num_layers=2")
    off_loss, _, _ = _step(patch(copy.deepcopy(net), _opt(False)), "standard")
    forced = patch(net, _opt(True))
    for layer in decoder_layers(forced):
        layer.mlp.forward.skip_down_when = torch.is_grad_enabled
    loss, _, _ = _step(forced, "standard")
    assert not torch.allclose(loss, off_loss, rtol=1e-3, atol=1e-3)


def test_no_skip_without_grad_with_a_hook_or_under_compile():
    net, _ = tiny_model("tiny_llama", "lora", "model.num_layers=1")
    patch(net, _opt(True))
    mlp = decoder_layers(net)[0].mlp
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = mlp(x)
        with layer_recompute():  # marked but no grad: the output is what the caller wants
            torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)
    seen = []
    handle = mlp.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    with layer_recompute():
        mlp(x)
    handle.remove()
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    assert mlp.forward.skip_down_when() is False  # the hook is gone, the mark is not set
    compiled = patch(tiny_model("tiny_llama", "lora", "model.num_layers=1")[0], _opt(True, compile=True))
    assert any(line.startswith(f"{NAME}: skipped (opt.compile") for line in patch_log(compiled))


def test_mark_is_set_only_in_the_recompute_context():
    forward_context, recompute_context = checkpoint_contexts()
    with forward_context:
        assert not in_layer_recompute()
    with contextlib.suppress(ValueError), recompute_context:
        assert in_layer_recompute()
        raise ValueError("an early stop leaves through an exception")
    assert not in_layer_recompute()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_function_backward_with_the_skip_matches_float64(dtype):
    """Function level: with skip_down the output is not computed, and every gradient (x, six LoRA
    tensors) still holds to the kernel tests' bar against float64, and equals the full forward's."""
    gen = torch.Generator().manual_seed(3)
    hidden, inter, rank, scale, tokens = 24, 40, 4, 2.0, 9

    def rand(*shape, s=1.0):
        return torch.randn(shape, generator=gen, dtype=torch.float64) * s

    x = rand(1, tokens, hidden)
    weights = [rand(inter, hidden, s=hidden**-0.5), rand(inter, hidden, s=hidden**-0.5), rand(hidden, inter, s=0.2)]
    shapes = [(rank, hidden), (inter, rank), (rank, hidden), (inter, rank), (rank, inter), (hidden, rank)]
    lora = [rand(*s, s=0.3) for s in shapes]
    dy = rand(1, tokens, hidden)

    def grads(fn, cast):
        xs = cast(x).requires_grad_(True)
        params = [cast(t).requires_grad_(True) for t in lora]
        out = fn(xs, [cast(w) for w in weights], params)
        return torch.autograd.grad(out, [xs, *params], cast(dy))

    def fused(skip):
        def fn(xs, ws, params):
            pairs = zip(ws, params[0::2], params[1::2])
            group = MLPGroup(
                *(
                    LoRAProjection(SimpleNamespace(weight=w, bias=None, out_features=w.shape[0]), a, b, scale)
                    for w, a, b in pairs
                ),
                gated_activation("silu"),
            )
            return _FusedMLPFunction.apply(xs, group, True, skip, *params)

        return fn

    def reference(xs, ws, params):
        def proj(t, w, a, b):
            return t @ w.t() + scale * (t @ a.t()) @ b.t()

        h = F.silu(proj(xs, ws[0], *params[0:2])) * proj(xs, ws[1], *params[2:4])
        return proj(h, ws[2], *params[4:6])

    def to_dtype(t):
        return t.detach().to(dtype)

    skipped, full = grads(fused(True), to_dtype), grads(fused(False), to_dtype)
    ref64, same = grads(reference, lambda t: t.detach().clone()), grads(reference, to_dtype)
    for i, (s, f, r, p) in enumerate(zip(skipped, full, ref64, same)):
        assert torch.equal(s, f), f"grad {i}"
        assert_close_to_reference(s, r, p, dtype, name=f"grad {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("mode", ["standard", "offload_double_buffer"])
def test_llama3_8b_two_layers_bf16_gpu(mode, method):
    """Llama-3-8B widths cut to 2 layers, bf16, 2 x 1024 tokens: 2 down weight reads per layer and step
    instead of 3, the same loss, and gradients within 1e-2 of each tensor's largest entry (~1 bf16 eps:
    the GPU's attention backward is not bit-reproducible from run to run)."""
    net, _ = tiny_model("llama3_8b", method, "model.num_layers=2", "model.dtype=bfloat16", device="cuda")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128256, (2, 1024), generator=gen).cuda() for _ in range(2)]
    off_loss, off_grads, off_reads = _step(patch(copy.deepcopy(net), _opt(False)), mode, batches)
    on_loss, on_grads, on_reads = _step(patch(net, _opt(True)), mode, batches)
    assert (off_reads, on_reads) == (READS_WITHOUT_SKIP, READS_WITH_SKIP)
    torch.testing.assert_close(on_loss, off_loss, rtol=0, atol=0)
    assert max_relative_error(on_grads, off_grads) < 1e-2


def test_the_row_counts_the_skipped_down_projections_out_of_hardware_flops():
    net, _ = tiny_model("tiny_llama", "lora")
    assert skipped_params_per_token(patch(copy.deepcopy(net), _opt(False))) == 0
    patched = patch(net, _opt(True))
    downs = [layer.mlp.forward.group.down[0] for layer in decoder_layers(patched)]
    expected = sum(d.base.out_features * d.base.in_features + d.base.out_features * d.rank for d in downs)
    assert expected > 0 and skipped_params_per_token(patched) == expected
