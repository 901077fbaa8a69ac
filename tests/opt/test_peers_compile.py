"""The torch.compile peer (opt.compile_scope): per decoder layer, every layer runs compiled with checkpointing,
attention causal without a mask and with grouped K/V, and it trains like eager; the whole-model scope (what HF
Trainer runs) is characterized: with checkpointing its layers stay eager and SDPA gets a materialized mask.

CPU tests swap inductor for the aot_eager backend (dynamo + AOTAutograd, no code generation): inductor on
this CPU takes ~40 s per model. The gpu-marked tests run inductor at Llama-3-8B widths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optkit.bench.setup import build_training
from optkit.config.compose import compose, typed_config
from optkit.opt import peers
from optkit.opt.patcher import unpatch
from optkit.train.method import decoder_layers
from tests.train._tiny import one_thread  # noqa: F401

TINY = ["model=tiny_llama", "train.checkpointing=standard", "data.seq_len=32", "train.lr=1e-2"]
KV_HEADS = 2  # tiny_llama: 4 query heads share 2 K/V heads
STEPS = 6  # 4 batches cycled: steps 4 and 5 revisit batches 0 and 1 after their updates
# float32, the same ops in another graph: measured 1e-6 at worst on these losses (~6.2); a wrong gradient
# (a missing recompute, a dropped adapter update) moves the revisited batches' losses by > 1e-2.
LOSS_RTOL = 1e-5


def _training(overrides, device="cpu"):
    return build_training(typed_config(compose([*TINY, *overrides])), torch.device(device))


def _counting_backend(graphs):
    """A dynamo backend that keeps each FX graph and counts how often its compiled code runs."""

    def backend(gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_func

        entry = {"graph": gm, "calls": 0}
        graphs.append(entry)

        def run(fx_module, _inputs):
            def call(*args):
                entry["calls"] += 1
                return make_boxed_func(fx_module.forward)(*args)

            call._boxed_call = True
            return call

        backward = lambda fx_module, _inputs: make_boxed_func(fx_module.forward)  # noqa: E731
        return aot_autograd(fw_compiler=run, bw_compiler=backward)(gm, example_inputs)

    return backend


def _sdpa_nodes(graph):
    return [n for n in graph.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]


def test_layer_scope_compiles_checkpointed_layers_with_causal_grouped_attention(monkeypatch):
    graphs = []
    monkeypatch.setattr(peers, "compile_kwargs", lambda cfg: {"backend": _counting_backend(graphs)})
    model, _, batches, _ = _training(["opt=compile"])
    model(**batches[0].tensors, use_cache=False).loss.backward()
    attention = [g for g in graphs if _sdpa_nodes(g["graph"])]
    assert len(attention) == 1, "one attention graph, shared by every layer (no recompiles per layer)"
    (node,) = _sdpa_nodes(attention[0]["graph"])
    assert node.kwargs.get("attn_mask") is None and node.kwargs.get("is_causal") is True, node.kwargs
    assert node.args[1].meta["example_value"].shape[1] == KV_HEADS, "K/V must not be repeated to the query heads"
    n_layers = len(decoder_layers(model))
    # forward once per layer, then again per layer in the checkpoint's recompute: compiled both times
    assert attention[0]["calls"] == 2 * n_layers, attention[0]["calls"]


def test_layer_scope_unpatch_restores_eager_children(monkeypatch):
    monkeypatch.setattr(peers, "compile_kwargs", lambda cfg: {"backend": "eager"})
    model, _, _, _ = _training(["opt=compile"])
    children = [c for layer in decoder_layers(model) for c in layer.children()]
    assert children and all(c._compiled_call_impl is not None for c in children)
    unpatch(model)
    assert all(c._compiled_call_impl is None for c in children)


def test_model_scope_leaves_checkpointed_layers_eager_with_a_materialized_mask(monkeypatch):
    """Why opt=compile_model is labelled as HF Trainer's mode and not the compile peer's best."""
    calls = []
    real = F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, *args, is_causal=False, **kwargs):
        calls.append((attn_mask is not None, is_causal, key.shape[1]))
        return real(query, key, value, attn_mask, *args, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(peers, "compile_kwargs", lambda cfg: {"backend": "aot_eager"})
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model, _, batches, _ = _training(["opt=compile_model"])
    model(**batches[0].tensors, use_cache=False).loss.backward()
    assert calls, "the decoder layers ran eagerly: SDPA was called from Python"
    assert all(masked and not causal for masked, causal, _ in calls), calls
    assert all(kv_heads != KV_HEADS for _, _, kv_heads in calls), "K/V repeated to the query heads"


def _loss_curve(overrides, backend=None, monkeypatch=None, device="cpu"):
    if backend is not None:
        monkeypatch.setattr(peers, "compile_kwargs", lambda cfg: {"backend": backend})
    model, optimizer, batches, _ = _training(overrides, device)
    losses = []
    for step in range(STEPS):
        loss = model(**batches[step % len(batches)].tensors, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_layer_scope_trains_like_eager(monkeypatch):
    eager = _loss_curve(["opt=baseline", "model.dtype=float32"])
    compiled = _loss_curve(["opt=compile", "model.dtype=float32"], "aot_eager", monkeypatch)
    assert eager[4] < eager[0] - 1e-3, "the revisited batch must show the updates (else the test proves nothing)"
    for step, (a, b) in enumerate(zip(eager, compiled)):
        assert abs(a - b) <= LOSS_RTOL * abs(a), f"step {step}: eager {a:.6f}, compiled per layer {b:.6f}"


# --------------------------------------------------------------------------- GPU: inductor at real widths

GPU_8B = ["model=llama3_8b", "model.num_layers=2", "model.dtype=bfloat16", "train.batch_size=2", "data.seq_len=2048"]
# bf16 at Llama-3-8B widths. Before any update (step 0, the same weights) another kernel order moves the loss
# by rounding only: within 3e-3. After updates the bf16 trajectories drift apart and back: per-layer inductor
# vs eager on the H100 (f488e55) 5.7e-6, 6.8e-5, 5.3e-4, 2.0e-4, 0.021, 0.013, 0.009, 0.007 over 8 steps (liger,
# full and full_compile stayed within 0.005 in an earlier pass). The failure this guards against is the
# whole-model compile's 0.227 at step 4: the curve bound sits at a quarter of it.
GPU_FIRST_STEP_ATOL, GPU_CURVE_ATOL = 3e-3, 0.05


def _assert_curves_agree(reference, other, label):
    gaps = [abs(a - b) for a, b in zip(reference, other)]
    detail = f"eager {reference}\n{label} {other}"
    assert gaps[0] <= GPU_FIRST_STEP_ATOL, detail
    assert max(gaps) <= GPU_CURVE_ATOL, detail


def _gpu_curve(overrides):
    model, optimizer, batches, _ = build_training(
        typed_config(compose([*GPU_8B, "train.checkpointing=standard", *overrides])), torch.device("cuda")
    )
    losses = []
    for step in range(STEPS + 2):
        loss = model(**batches[step % len(batches)].tensors, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.gpu
def test_layer_scope_inductor_trains_like_eager_gpu():
    eager, compiled = _gpu_curve(["opt=baseline"]), _gpu_curve(["opt=compile"])
    _assert_curves_agree(eager, compiled, "compile per layer")


@pytest.mark.gpu
def test_materialized_causal_mask_trains_like_is_causal_gpu(monkeypatch):
    """Diagnosis of the whole-model gap: eager HF with the mask HF builds under tracing (boolean, K/V
    repeated, SDPA's efficient kernel) against eager with is_causal (flash). A failure here puts the whole-model
    compile's loss gap on that SDPA path, not on compilation."""
    import transformers.masking_utils as masking

    eager = _gpu_curve(["opt=baseline"])
    for name in ("_ignore_causal_mask_sdpa",):
        monkeypatch.setattr(masking, name, lambda *args, **kwargs: False)
    masked = _gpu_curve(["opt=baseline"])
    _assert_curves_agree(eager, masked, "materialized mask")
