"""What a measured point trains, built exactly as the point builds it (tests and diagnosis reuse it):
model -> training method (LoRA / QLoRA / full) -> optkit.patch -> gradient checkpointing -> optimizer ->
the batches the loop cycles through.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

import torch

from optkit.config.schema import OptkitConfig
from optkit.measure.device_timing import synchronize
from optkit.models import build_model, build_model_layerwise, torch_dtype
from optkit.opt import patcher
from optkit.opt.registry import missing_requirements
from optkit.train.checkpointing import enable_checkpointing
from optkit.train.distributed import build_device, distribute, local_batches, unsupported_reason
from optkit.train.method import add_lora, apply_training_method, decoder_layers
from optkit.train.optimizers import build_optimizer
from optkit.train.packing import install_packed_attention
from optkit.train.qlora import LayerQuantizer

N_DISTINCT_BATCHES = 4  # cycled, so no step re-reads the exact tensors of the previous one


class SkipPoint(RuntimeError):
    """The point cannot run here (missing GPU, library, unsupported model); recorded as `skipped`."""


def build_training(cfg: OptkitConfig, device: torch.device, times: Optional[Dict[str, float]] = None):
    """Model -> training method -> optkit.patch -> checkpointing -> optimizer -> batches, exactly as a
    measured point builds them (diagnosis scripts reuse it). Returns (model, optimizer, batches, ckpt_info).
    ``times``, when given, gets the seconds each part took ("model": built, adapted, patched, checkpointed;
    "distribute", "optimizer", "batches"), a synchronized wall clock on a GPU."""
    clock = _SetupClock(device, times)
    missing = missing_requirements(cfg.opt, device=device)
    unsupported = unsupported_reason(cfg.train)  # a distributed mode this launch or torch cannot run
    if missing or unsupported:
        raise SkipPoint("; ".join(missing + ([unsupported] if unsupported else [])))
    torch.manual_seed(cfg.train.seed)
    built_on = build_device(cfg.train, device)  # the meta device under train.sharded_init
    model, ckpt_info = build_unsloth(cfg, device) if cfg.opt.unsloth else build_patched_model(cfg, built_on)
    clock.mark("model")
    vocab_size = model.config.vocab_size
    # DDP / FSDP2 wrap the patched, checkpointed model; the optimizer then gets FSDP2's sharded parameters
    model = distribute(model, cfg.train, device)
    clock.mark("distribute")
    optimizer = build_optimizer(model.parameters(), cfg.train)
    clock.mark("optimizer")
    batches = [  # this rank's rows of each global batch (all of them on one process)
        b.to(device)
        for b in local_batches(cfg.data, cfg.train.batch_size, vocab_size, N_DISTINCT_BATCHES, cfg.train.seed)
    ]
    clock.mark("batches")
    model.train()
    return model, optimizer, batches, ckpt_info


class _SetupClock:
    """Seconds between marks into ``times`` (nothing kept without it); the device is synchronized at each mark
    so a part's queued kernels count in that part."""

    def __init__(self, device: torch.device, times: Optional[Dict[str, float]]):
        self.device, self.times = device, times
        self.last = time.perf_counter()

    def mark(self, part: str) -> None:
        if self.times is None:
            return
        synchronize(self.device)
        now = time.perf_counter()
        self.times[part] = round(now - self.last, 3)
        self.last = now


def build_patched_model(cfg: OptkitConfig, device: torch.device):
    """(model, checkpointing info): the base model, its training method, optkit.patch, then checkpointing."""
    model = build_base_model(cfg, device)
    # A QLoRA base is quantized as it is built: what is left of its training method is LoRA.
    if cfg.train.method == "qlora":
        model = add_lora(model, cfg.train, cfg.opt.adapter_dtype)
    else:
        model = apply_training_method(model, cfg.train, cfg.opt.adapter_dtype)
    if cfg.data.packing:  # padding-free rows need boundary-aware attention (metadata per layer, as HF)
        install_packed_attention(model)
    model = patcher.patch(model, cfg.opt)
    return model, enable_checkpointing(model, cfg.train.checkpointing) or {}


def build_unsloth(cfg: OptkitConfig, device: torch.device):
    """(model, checkpointing info) from Unsloth's own calls on the point's checkpoint directory (written from
    optkit's random weights when missing): its process imported unsloth first (bench/unsloth_point.py)."""
    from optkit.bench.checkpoint_cache import ensure_checkpoint
    from optkit.opt.unsloth_peer import build_unsloth_model
    from optkit.opt.unsloth_peer import unsupported_reason as unsloth_unsupported

    reason = unsloth_unsupported(cfg)
    if reason:
        raise SkipPoint(f"unsloth: {reason}")
    model, info = build_unsloth_model(cfg, ensure_checkpoint(cfg.model, cfg.train.seed, device))
    return patcher.patch(model, cfg.opt), info


def build_base_model(cfg: OptkitConfig, device: torch.device):
    """The model before its training method. QLoRA's is quantized one decoder layer at a time on ``device``
    (as from_pretrained(quantization_config=...) loads), so its setup never holds the full-precision model
    there: the setup peak is about the training one (8B: the quantized model plus one bf16 layer)."""
    if cfg.train.method != "qlora":
        return build_model(cfg.model, device, seed=cfg.train.seed)
    quantize = LayerQuantizer(cfg.train, torch_dtype(cfg.model.dtype))
    return quantize.finish(build_model_layerwise(cfg.model, device, cfg.train.seed, decoder_layers, quantize))
