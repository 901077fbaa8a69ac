"""optkit.patch on the models users hand it: patched before get_peft_model and again after, a plain HF model
(full fine-tuning, no peft) under Trainer, and a model loaded 4-bit with
``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` (bitsandbytes runs it on CPU).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import optkit
from optkit.kernels.nf4_dequantize import reference_nf4_dequantize
from tests.integration._harness import (
    STEPS,
    FusedLossSpy,
    add_lora,
    assert_same_curve,
    batches,
    full_without_rope,
    hand_loop,
    one_thread,  # noqa: F401
    tiny_hf,
)
from tests.integration.test_hf_trainer import _train


def _lora_layers(model):
    return sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A"))


def test_patch_before_and_after_get_peft_model():
    reference = hand_loop(add_lora(tiny_hf()))
    base = optkit.patch(tiny_hf(), full_without_rope())
    assert any(
        line.startswith("fused_lora: skipped (the model has no LoRA adapters; call optkit.patch again")
        for line in optkit.patch_log(base)
    )
    model = add_lora(base)  # peft wraps the projections inside optkit's modules
    lora_layers = _lora_layers(model)
    optkit.patch(model, full_without_rope())  # the adapters now exist: fused LoRA goes in, nothing is patched twice
    log = optkit.patch_log(model)
    assert any(line.startswith("fused_lora: QKV+O fused in 2/2 layers, MLP in 2/2") for line in log), log
    assert sum(line.startswith("rms_norm:") for line in log) == 1, log
    spy = FusedLossSpy()
    with spy.watching():
        patched = hand_loop(model)
    assert spy.calls == STEPS
    assert_same_curve(patched, reference)

    ids = batches(1)[0]["input_ids"]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        optkit.unpatch(model)
        after = model(input_ids=ids).logits
    assert optkit.patch_log(model) == [] and optkit.patch_log(base) == []
    assert _lora_layers(model) == lora_layers, "unpatch dropped LoRA layers peft added after patching"
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_plain_hf_model_full_finetuning_under_trainer(tmp_path):
    _, reference = _train(tiny_hf(), tmp_path / "reference")
    spy = FusedLossSpy()
    with spy.watching():
        trainer, patched = _train(optkit.patch(tiny_hf(), full_without_rope()), tmp_path / "patched")
    assert spy.calls == STEPS
    assert any(line.startswith("fused_lora: skipped") for line in optkit.patch_log(trainer.model))
    assert_same_curve(patched, reference)


def _save_tiny(tmp_path):
    tiny_hf().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _load_4bit(path):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    return model.train()


def _fp32_twin(quantized):
    """The same model in fp32: each 4-bit weight dequantized (optkit's float reference), the rest upcast."""
    twin = tiny_hf()
    modules = dict(quantized.named_modules())
    state = {}
    for name, value in quantized.state_dict().items():
        owner = modules.get(name.rpartition(".")[0])
        if name.endswith(".weight") and getattr(owner.weight, "quant_state", None) is not None:
            value = reference_nf4_dequantize(owner.weight, owner.weight.quant_state)
        if name in twin.state_dict():
            state[name] = value.float()
    twin.load_state_dict(state)
    return twin


def test_bitsandbytes_4bit_from_pretrained(tmp_path):
    path = _save_tiny(tmp_path)
    quantized = _load_4bit(path)
    assert type(quantized.model.layers[0].mlp.gate_proj).__name__ == "Linear4bit"
    truth = hand_loop(add_lora(_fp32_twin(quantized)))
    reference = hand_loop(add_lora(quantized))
    model = optkit.patch(add_lora(_load_4bit(path)), full_without_rope())
    assert any(line.startswith("fused_lora: QKV+O fused in 2/2 layers, MLP in 2/2") for line in optkit.patch_log(model))
    spy = FusedLossSpy()
    with spy.watching():
        patched = hand_loop(model)
    assert spy.calls == STEPS
    assert_same_curve(patched, reference, torch.bfloat16, truth)

    # bitsandbytes' CPU inference path (a Linear4bit forward in eval mode without grad: an evaluation or a sanity
    # generation without optkit) repacks the 4-bit weights in place; training after it must still dequantize the
    # real NF4 codes
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        trained = model(input_ids=ids, labels=ids).loss
        linears = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
        for linear in linears:
            linear.eval()
            linear(torch.randn(1, linear.in_features, dtype=torch.bfloat16))
            linear.train()
        if not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linears):
            pytest.skip("bitsandbytes did not repack on this CPU (no AVX512-BF16): nothing more to check")
        again = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(again, trained, rtol=0, atol=0)
