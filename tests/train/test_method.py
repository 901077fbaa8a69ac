"""train.method: full / lora / qlora on tiny models (CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from optkit.models import build_model  # noqa: E402
from optkit.train.method import apply_training_method, decoder_layers  # noqa: E402
from tests.train._tiny import config, loss_and_grads, one_thread, tiny_model, token_batch  # noqa: E402,F401

DECODER_LINEARS = 7  # q, k, v, o, gate, up, down


def test_full_trains_every_parameter():
    net, _ = tiny_model("tiny_llama", "full")
    assert all(p.requires_grad for p in net.parameters())
    loss, grads = loss_and_grads(net, token_batch(0))
    assert torch.isfinite(loss) and len(grads) == len(list(net.parameters()))


def test_lora_trains_only_adapters_of_the_targets():
    net, cfg = tiny_model("tiny_llama", "lora", "train.lora_targets=[q_proj,v_proj]", "train.lora_r=4")
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    n_layers = cfg.model.hf_config.num_hidden_layers
    assert len(trainable) == 2 * 2 * n_layers  # A and B of two targets per layer
    assert all(4 in p.shape for p in trainable.values())
    _, grads = loss_and_grads(net, token_batch(0))
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_lora_with_unknown_targets_says_what_to_set():
    cfg = config("tiny_llama", "lora", "train.lora_targets=[query]")
    with pytest.raises(ValueError, match="train.lora_targets"):
        apply_training_method(build_model(cfg.model, "cpu"), cfg.train)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])
def test_qlora_quantizes_decoder_linears_to_nf4(model):
    cfg = config(model, "qlora")
    original = build_model(cfg.model, "cpu")
    weights = {n: p.detach().clone() for n, p in original.named_parameters()}
    net = apply_training_method(original, cfg.train)
    quantized = [(n, m) for n, m in net.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    n_layers = cfg.model.hf_config.num_hidden_layers
    assert len(quantized) == DECODER_LINEARS * n_layers
    for name, module in quantized:
        state = module.weight.quant_state
        assert state.quant_type == "nf4" and state.nested, name  # NF4 with double quantization
        assert module.compute_dtype == torch.float32 == state.dtype  # the tiny models' dtype
        # the model's own weights were quantized: NF4 keeps them within ~1/7 of each 64-block's absmax
        key = name.replace("base_model.model.", "").replace(".base_layer", "") + ".weight"
        dequantized = bnb.functional.dequantize_4bit(module.weight, state)
        assert (dequantized - weights[key]).abs().max() <= 0.15 * weights[key].abs().max(), name
    # embeddings and LM head stay in full precision; biases (Qwen2 q/k/v) are kept
    assert not isinstance(net.get_output_embeddings(), bnb.nn.Linear4bit)
    if model == "tiny_qwen2":
        attn = decoder_layers(net)[0].self_attn
        assert attn.q_proj.base_layer.bias is not None and attn.o_proj.base_layer.bias is None
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    loss, grads = loss_and_grads(net, token_batch(1))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_qlora_skips_moe_routers():
    cfg = config("tiny_qwen3_moe", "qlora", "train.lora_targets=[q_proj,v_proj]")
    net = apply_training_method(build_model(cfg.model, "cpu"), cfg.train)
    for name, module in net.named_modules():
        if name.endswith("mlp.gate"):
            assert not isinstance(module, bnb.nn.Linear4bit), name


def test_decoder_layers_found_through_peft():
    net, cfg = tiny_model("tiny_qwen3", "lora")
    layers = decoder_layers(net)
    assert isinstance(layers, nn.ModuleList) and len(layers) == cfg.model.hf_config.num_hidden_layers
    with pytest.raises(ValueError, match="decoder layers"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_experts_in_lora_targets_adds_expert_adapters_that_train():
    """train.lora_targets=[..., experts] puts LoRA on the 3D MoE expert weights (optkit's grouped path)."""
    from optkit.config.compose import compose
    from optkit.models import build_model
    from optkit.train.method import apply_training_method

    cfg = compose(["model=tiny_qwen3_moe", "train.lora_targets=[q_proj,v_proj,experts]"])
    model = apply_training_method(build_model(cfg.model), cfg.train)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expert_adapters = [n for n in trainable if "experts" in n]
    assert expert_adapters, f"no expert adapters among trainable params: {sorted(trainable)[:8]}"
    assert all(trainable[n].grad is not None for n in expert_adapters)
    assert any(trainable[n].grad.abs().sum() > 0 for n in expert_adapters)
    frozen_expert_weights = [n for n, p in model.named_parameters() if n.endswith("experts.gate_up_proj")]
    assert all(not dict(model.named_parameters())[n].requires_grad for n in frozen_expert_weights)
