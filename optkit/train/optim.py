"""Optimizers by name (train.optimizer)."""
from __future__ import annotations

import torch


def build_optimizer(params, train_cfg) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check train.method and train.lora_targets")
    name = train_cfg.optimizer
    kwargs = dict(lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, foreach=True, **kwargs)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    raise NotImplementedError(f"train.optimizer={name!r} is not implemented yet")
