"""opt.adapter_dtype: peft's float32 adapters (baseline) or adapters in the model's dtype (baseline_bf16, peft's
autocast_adapter_dtype=False), for LoRA and for QLoRA, where peft would leave them float32 beside the 4-bit
weights; the LoRA math then runs in that dtype (no upcast of the input)."""

from __future__ import annotations

import pytest
import torch

from optkit.bench.point_facts import adapter_dtype
from optkit.bench.setup import build_patched_model
from optkit.config.compose import compose, typed_config
from tests.train._tiny import one_thread  # noqa: F401


def _model(*overrides):
    cfg = typed_config(compose(["model=tiny_llama", "model.dtype=bfloat16", "data.seq_len=32", *overrides]))
    return build_patched_model(cfg, torch.device("cpu"))[0]


def _lora_input_dtypes(model):
    """dtypes of the inputs every lora_A linear sees in one forward."""
    seen = set()
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: seen.add(args[0].dtype))
        for n, m in model.named_modules()
        if n.endswith("lora_A.default")
    ]
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_bf16_adapters_keep_the_lora_math_in_bf16(method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    fp32 = _model(f"train={method}", "opt=baseline")
    bf16 = _model(f"train={method}", "opt=baseline_bf16")
    assert adapter_dtype(fp32) == "float32" and _lora_input_dtypes(fp32) == {torch.float32}
    assert adapter_dtype(bf16) == "bfloat16" and _lora_input_dtypes(bf16) == {torch.bfloat16}
    trainable = [p for p in bf16.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 and p.grad is not None for p in trainable)


def test_full_training_has_no_adapters():
    assert adapter_dtype(_model("train=full", "opt=baseline_bf16")) is None
