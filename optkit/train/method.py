"""train.method: which parameters train (full), LoRA adapters through peft (lora), or NF4 + LoRA (qlora).

``apply_training_method(model, train_cfg)`` returns the model to train: the same HF model for
``full``, a ``peft.PeftModel`` for ``lora`` and ``qlora``. peft's defaults are kept as a user gets
them (adapter weights upcast to float32, ``bias="none"``), because that is the baseline the
optimizations are measured against.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from optkit.train.moe import add_expert_lora
from optkit.train.qlora import quantize_linears

METHODS = ("full", "lora", "qlora")  # train.method
ADAPTER_METHODS = ("lora", "qlora")  # methods that train LoRA adapters on frozen weights
ADAPTER_DTYPES = ("float32", "model")  # opt.adapter_dtype: peft's float32 adapters, or the model's dtype


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM, also through peft wrappers (the first list of *DecoderLayer)."""
    for module in model.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module)
            and all(type(layer).__name__.endswith("DecoderLayer") for layer in module)
        ):
            return module
    raise ValueError(
        f"found no decoder layers in {type(model).__name__}: expected an HF causal LM whose layers are "
        "*DecoderLayer modules in one nn.ModuleList (llama, mistral, qwen2, qwen3, qwen3_moe, gemma2)"
    )


def model_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    raise ValueError("the model has no floating-point parameters to take a compute dtype from")


def quantize_for_qlora(model: nn.Module, train_cfg) -> List[str]:
    """Quantize the decoder-block linears in place (compute dtype = model dtype); returns their names."""
    compute_dtype = model_dtype(model)
    replaced = quantize_linears(
        decoder_layers(model),
        quant_type=train_cfg.qlora_quant_type,
        double_quant=train_cfg.qlora_double_quant,
        compute_dtype=compute_dtype,
    )
    if not replaced:
        raise ValueError("train.method=qlora found no nn.Linear inside the decoder layers to quantize")
    # peft wraps a bnb Linear4bit with its 4-bit LoRA layer only when the model says it is loaded in
    # 4 bit (what from_pretrained(quantization_config=...) would have set).
    model.is_loaded_in_4bit = True
    return replaced


def add_lora(model: nn.Module, train_cfg, adapter_dtype: str = "float32") -> nn.Module:
    """peft LoRA on ``train_cfg.lora_targets``; ``adapter_dtype="model"`` keeps the adapters in the model's
    dtype (peft's ``autocast_adapter_dtype=False``: x is not upcast, the LoRA math runs in bf16; beside a 4-bit
    QLoRA weight peft takes the layer's compute dtype)."""
    from peft import LoraConfig, get_peft_model

    if adapter_dtype not in ADAPTER_DTYPES:
        raise ValueError(
            f"opt.adapter_dtype={adapter_dtype!r} is not valid; choose one of: {', '.join(ADAPTER_DTYPES)}"
        )

    # "experts" names the 3D MoE expert weights: peft cannot wrap them, optkit's grouped path carries
    # their adapters (optkit.train.moe), added after peft has frozen the base weights.
    targets = [t for t in train_cfg.lora_targets if t != "experts"]
    config = LoraConfig(
        r=train_cfg.lora_r,
        lora_alpha=train_cfg.lora_alpha,
        lora_dropout=train_cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=adapter_dtype == "float32")
    except ValueError as exc:
        raise ValueError(
            f"peft could not add LoRA to {type(model).__name__} with train.lora_targets="
            f"{list(train_cfg.lora_targets)}: {exc}. Set train.lora_targets to module names of this model"
        ) from exc
    if "experts" in train_cfg.lora_targets:
        apply_expert_lora(peft_model.get_base_model(), train_cfg)
    return peft_model


def apply_expert_lora(model, train_cfg) -> List[str]:
    """Expert LoRA when train.method is lora/qlora and "experts" is in train.lora_targets (QLoRA: NF4 experts)."""
    if train_cfg.method not in ADAPTER_METHODS or "experts" not in list(train_cfg.lora_targets):
        return []
    return add_expert_lora(model, train_cfg.lora_r, train_cfg.lora_alpha, quantize=train_cfg.method == "qlora")


def apply_training_method(model: nn.Module, train_cfg, adapter_dtype: str = "float32") -> nn.Module:
    """Prepare ``model`` for ``train_cfg.method`` (full | lora | qlora) and return the model to train."""
    method = train_cfg.method
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if method == "qlora":
        quantize_for_qlora(model, train_cfg)
    elif method != "lora":
        raise ValueError(f"train.method={method!r} is not valid; choose one of: {', '.join(METHODS)}")
    return add_lora(model, train_cfg, adapter_dtype)
