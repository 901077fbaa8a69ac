"""Build an HF transformers causal LM from a published shape (random weights) or a local checkpoint.

No download ever happens: shapes come from ``conf/model/<name>.yaml`` (copied from each model's
published config.json), and ``model.path`` loads a local directory with ``local_files_only``.
Throughput and memory do not depend on weight values, so random weights measure what real ones
would. The builder knows nothing of optimizations (those are the patcher's job).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

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
    if model_cfg.path:
        model = _load_local(model_cfg.path, dtype, device, model_cfg.num_layers, model_cfg.attn_implementation)
    else:
        model_cls, config = _model_class_and_config(model_cfg)
        torch.manual_seed(seed)
        with _default_dtype(dtype), torch.device(device):
            model = model_cls(config)
    return _finish(model, model_cfg)


LayersOf = Callable[[nn.Module], nn.ModuleList]


def build_model_layerwise(
    model_cfg,
    device: torch.device | str,
    seed: int,
    layers_of: LayersOf,
    each_layer: Callable[[int, nn.Module], None],
) -> nn.Module:
    """Build the model with its decoder layers reaching ``device`` one at a time, as
    ``from_pretrained(quantization_config=...)`` loads a checkpoint: ``each_layer(index, layer)`` runs on
    each layer as soon as it is on ``device`` (QLoRA quantizes it there), before the next layer exists
    there, so ``device`` never holds more than one layer as built besides what ``each_layer`` leaves.

    Random weights: the model is made on the meta device (no memory, no init), then each module gets its
    parameters on ``device`` and the family's own ``_init_weights`` (the init HF applies when it builds,
    buffers such as rotary frequencies included); same seed, same weights. A local checkpoint is loaded
    into host memory, everything outside the layers moved to ``device``, then each layer. ``layers_of``
    finds the decoder layers (optkit.train.method.decoder_layers)."""
    device = torch.device(device)
    dtype = torch_dtype(model_cfg.dtype)
    created: Dict[int, nn.Parameter] = {}  # meta parameter -> its materialized one (tied weights stay tied)
    if model_cfg.path:
        host = torch.device("cpu")
        model = _load_local(model_cfg.path, dtype, host, model_cfg.num_layers, model_cfg.attn_implementation)
    else:
        model_cls, config = _model_class_and_config(model_cfg)
        torch.manual_seed(seed)
        with _default_dtype(dtype), torch.device("meta"):
            model = model_cls(config)

    def place(module: nn.Module) -> None:
        if model_cfg.path:
            module._apply(lambda t: t.to(device), recurse=False)
        else:
            _materialize(model, module, device, created)

    layers = layers_of(model)
    in_layers = {id(m) for m in layers.modules()}
    for module in model.modules():
        if id(module) not in in_layers:
            place(module)
    for index, layer in enumerate(layers):
        for module in reversed(list(layer.modules())):  # children first, as HF's own init visits them
            place(module)
        each_layer(index, layer)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"layerwise build left tensors on the meta device: {left[:5]}")
    return _finish(model, model_cfg)


def _materialize(model: nn.Module, module: nn.Module, device: torch.device, created: Dict[int, nn.Parameter]) -> None:
    """``module``'s own meta parameters and buffers made on ``device`` and initialized as the family does."""
    for name, param in module._parameters.items():
        if param is not None and param.device.type == "meta":
            if id(param) not in created:
                created[id(param)] = nn.Parameter(torch.empty_like(param, device=device), param.requires_grad)
            module._parameters[name] = created[id(param)]
    for name, buffer in module._buffers.items():
        if buffer is not None and buffer.device.type == "meta":
            module._buffers[name] = torch.empty_like(buffer, device=device)
    with torch.no_grad():
        model._init_weights(module)


def _model_class_and_config(model_cfg):
    _, model_cls = family_classes(model_cfg.family)
    config = build_hf_config(model_cfg.family, _to_dict(model_cfg.hf_config), model_cfg.num_layers)
    config._attn_implementation = model_cfg.attn_implementation
    return model_cls, config


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _finish(model: nn.Module, model_cfg) -> nn.Module:
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
