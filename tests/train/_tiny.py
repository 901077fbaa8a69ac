"""Tiny models, batches and gradient helpers shared by the training-method tests (CPU, seq 32).

Import ``one_thread`` into a test module to run it on one intra-op thread: on a shared 2-core machine
torch's default of 2 spinning threads makes these tiny matmuls ~50x slower.
"""

from __future__ import annotations

import functools
from typing import Dict, Tuple

import pytest
import torch

from optkit.config.compose import compose
from optkit.models import build_model
from optkit.train.method import apply_training_method

SEQ_LEN = 32
BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.lru_cache(maxsize=None)
def config(model: str, method: str, *overrides: str):
    return compose([f"model={model}", f"train={method}", *overrides])


def tiny_model(model: str = "tiny_llama", method: str = "lora", *overrides: str, device="cpu", seed: int = 0):
    """A built, training-method-applied tiny model; LoRA B gets random values (peft starts it at zero,
    which would make every gradient of A zero and let a wrong dA pass)."""
    cfg = config(model, method, *overrides)
    net = apply_training_method(build_model(cfg.model, device, seed=seed), cfg.train)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return net, cfg


def token_batch(seed: int, vocab_size: int = 512, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (BATCH, SEQ_LEN), generator=gen).to(device)


def loss_and_grads(net, ids: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    loss = net(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"trainable parameters without a gradient: {missing[:5]}"
    return loss.detach(), {n: p.grad.detach().clone() for n, p in trainable.items()}


def max_relative_error(grads: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> float:
    """max over parameters of max|g - ref| / max|ref| (a per-tensor scale: small entries don't dominate)."""
    assert grads.keys() == reference.keys(), "different sets of trainable parameters"
    return max(
        (
            (grads[k].double() - reference[k].double()).abs().max() / reference[k].double().abs().max().clamp_min(1e-30)
        ).item()
        for k in reference
    )
