"""Build an HF transformers causal LM from a published shape (random weights) or a local checkpoint.

No download ever happens: shapes come from ``conf/model/<name>.yaml`` (copied from each model's
published config.json), and ``model.path`` loads a local directory with ``local_files_only``.
Throughput and memory do not depend on weight values, so random weights measure what real ones
would. The builder knows nothing of optimizations (those are the patcher's job).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from optkit.families import family_classes

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} unknown; choose one of: {', '.join(DTYPES)}") from None


def build_hf_config(family: str, hf_config: Dict[str, Any], num_layers: Optional[int] = None):
    """The transformers config object for a zoo entry, optionally cut to ``num_layers`` layers."""
    config_cls, _ = family_classes(family)
    kwargs = dict(hf_config)
    if num_layers is not None:
        kwargs["num_hidden_layers"] = int(num_layers)
        kwargs.pop("layer_types", None)  # derived from the layer count when absent
        if "mlp_only_layers" in kwargs:
            kwargs["mlp_only_layers"] = [i for i in kwargs["mlp_only_layers"] if i < num_layers]
    return config_cls(**kwargs)


def _load_local(path: str, dtype: torch.dtype, device: torch.device, num_layers, attn_implementation):
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.path={path!r} is not a directory (expected a checkpoint with config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if num_layers is not None:
        config.num_hidden_layers = int(num_layers)
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: int(num_layers)]
    return AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        dtype=dtype,
        device_map={"": device},
        local_files_only=True,
        attn_implementation=attn_implementation,
    )


def build_model(model_cfg, device: torch.device | str = "cpu", seed: int = 0) -> torch.nn.Module:
    """Build the model described by ``model_cfg`` (a ModelConfig or DictConfig) on ``device``.

    Random weights are created directly on the target device and dtype (no CPU copy of an 8B model).
    """
    device = torch.device(device)
    dtype = torch_dtype(model_cfg.dtype)
    attn = model_cfg.attn_implementation
    if model_cfg.path:
        model = _load_local(model_cfg.path, dtype, device, model_cfg.num_layers, attn)
    else:
        _, model_cls = family_classes(model_cfg.family)
        config = build_hf_config(model_cfg.family, _to_dict(model_cfg.hf_config), model_cfg.num_layers)
        config._attn_implementation = attn
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        try:
            torch.set_default_dtype(dtype)
            with torch.device(device):
                model = model_cls(config)
        finally:
            torch.set_default_dtype(previous)
    experts = getattr(model_cfg, "experts_implementation", None)
    if experts:
        _set_experts_implementation(model, experts)
    return model


def _set_experts_implementation(model, name: str) -> None:
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None:
        setter(name)
        return
    if not hasattr(model.config, "_experts_implementation"):
        raise ValueError(f"this transformers version has no experts_implementation switch (asked for {name!r})")
    model.config._experts_implementation = name


def _to_dict(node) -> Dict[str, Any]:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:
        pass
    return dict(node)


def count_parameters(model: torch.nn.Module) -> Dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total_params": total, "trainable_params": trainable}
