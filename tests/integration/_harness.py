"""What the trainer tests share: tiny models built twice alike, learnable data, a spy on optkit's fused loss,
and the loss-curve comparison with its per-dtype tolerance.

Every test trains the same model twice for STEPS optimizer steps, patched (``optkit.patch(model, "full")``)
and not, from identical weights (LoRA B random, so adapters matter from step one) on identical batches, at a
learning rate that moves the loss well beyond the tolerance in those steps (asserted), so a wrong gradient,
a wrong loss normalization or a dropped adapter shows up as a different curve.

The optimizer is SGD with gradients clipped to norm 1 (Trainer's max_grad_norm): its update is proportional to
the gradient, so a gradient off by a constant factor changes the curve and rounding noise stays
rounding-sized. Adam's first steps are sign(g)-like: rounding noise in near-zero gradient entries becomes
full-size updates (bf16 runs then strayed ~1.6% from fp32 in 5 steps) and a constant factor is invisible.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Dict, List, Optional

import pytest
import torch

from optkit.config.compose import compose
from optkit.data.learnable import learnable_batch
from optkit.models import build_model

MODEL = "tiny_llama"
OPT = "full"  # what a user's script patches with
STEPS = 5
BATCH = 2
SEQ = 8  # tokens, not model size, set these tests' time: the Triton interpreter runs ~1 program per token
OPTIM = "sgd"
LR = 0.3  # SGD on clipped gradients: moves the loss ~4-5% in STEPS steps, ~10x the bf16 runs' spread
CLIP = 1.0
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Tolerances, relative to the loss. fp32: |patched - unpatched| per step (kernels differ from HF's eager ops
# by reduction order only, ~1e-6 seen). Under autocast both runs round every matmul to 8 (bf16) or 11 (fp16)
# mantissa bits, differently, and training amplifies it (the unpatched bf16 run itself strays ~1e-3 from fp32
# math in 5 steps); so there the patched run must stay as close to the same training in fp32 (``truth``) as the
# unpatched run does: |patched - truth| <= 2 |unpatched - truth| + about one unit of the dtype's rounding.
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2**-8, torch.float16: 2**-11}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine a second intra-op thread only spins
    yield
    torch.set_num_threads(previous)


def full_without_rope():
    """opt "full" but RoPE: the Triton interpreter runs optkit's RoPE one program per token, ~3/4 of a patched
    step here; the runs where autocast meets RoPE (bf16, fp16, TRL's bf16 default) keep it on."""
    from optkit.opt.registry import load_opt_config

    cfg = load_opt_config(OPT)
    cfg.kernels.rope = False
    return cfg


def tiny_hf(dtype: str = "float32", seed: int = 0) -> torch.nn.Module:
    return build_model(compose([f"model={MODEL}", f"model.dtype={dtype}"]).model, "cpu", seed=seed).train()


def add_lora(model: torch.nn.Module, dropout: float = 0.0, seed: int = 1, **config):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=dropout, target_modules=LORA_TARGETS, task_type="CAUSAL_LM", **config
    )
    torch.manual_seed(seed)  # peft draws A from the global generator
    model = get_peft_model(model, lora)
    randomize_lora_b(model, seed)
    return model


def randomize_lora_b(model: torch.nn.Module, seed: int = 1) -> None:
    """peft starts B at zero, which makes every gradient of A zero in the first step and hides a wrong dA."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_((torch.randn(param.shape, generator=gen) * 0.05).to(param.dtype))


def token_rows(n_rows: int, seq: int = SEQ, seed: int = 0, vocab: int = 512) -> Dict[str, torch.Tensor]:
    """Two learnable rows, repeated, with a prompt of varying length masked out of the labels (-100): each
    micro-batch then has its own count of trained tokens, so a loss averaged per micro-batch instead of over
    the whole accumulated batch (num_items_in_batch) gives a different curve."""
    distinct = learnable_batch(2, seq, vocab, torch.Generator().manual_seed(seed)).tensors["input_ids"]
    ids = distinct.repeat(-(-n_rows // 2), 1)[:n_rows]  # two rows over and over: 5 steps visibly learn them
    labels = ids.clone()
    for row in range(n_rows):
        labels[row, : row % 4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def token_dataset(n_rows: int, seq: int = SEQ, seed: int = 0):
    """``token_rows`` as a datasets.Dataset, plus a text column the model does not take (Trainer's
    remove_unused_columns must drop it and keep the rest)."""
    from datasets import Dataset

    rows = token_rows(n_rows, seq, seed)
    columns = {name: tensor.tolist() for name, tensor in rows.items()}
    columns["source"] = [f"row {i}" for i in range(n_rows)]
    return Dataset.from_dict(columns)


def batches(n: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    rows = token_rows(n * BATCH, seed=seed)
    return [{k: v[i * BATCH : (i + 1) * BATCH] for k, v in rows.items()} for i in range(n)]


class FusedLossSpy:
    """Counts calls of optkit's fused linear cross-entropy (the kernel module's function, which the patched
    forward looks up on every call) and records the reduction of each."""

    def __init__(self):
        self.reductions: List[str] = []

    @property
    def calls(self) -> int:
        return len(self.reductions)

    @contextlib.contextmanager
    def watching(self):
        module = importlib.import_module("optkit.kernels.fused_linear_cross_entropy")
        real = module.fused_linear_cross_entropy

        def spy(*args, **kwargs):
            self.reductions.append(kwargs.get("reduction", "mean"))
            return real(*args, **kwargs)

        module.fused_linear_cross_entropy = spy
        try:
            yield self
        finally:
            module.fused_linear_cross_entropy = real


def hand_loop(
    model, steps: int = STEPS, autocast: Optional[torch.dtype] = None, accelerator=None, lr: float = LR
) -> List[float]:
    """SGD steps on ``batches``, gradients clipped as Trainer does; under ``torch.autocast`` when asked,
    through an Accelerator when given."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for batch in batches(steps):
        context = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
        with context:
            loss = model(**batch).loss
        if accelerator is not None:
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, CLIP)
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def assert_same_curve(
    patched: List[float],
    reference: List[float],
    dtype: torch.dtype = torch.float32,
    truth: Optional[List[float]] = None,
) -> None:
    """The patched curve is the unpatched one (fp32), or as close to ``truth`` as it (autocast); see RTOL."""
    assert len(patched) == len(reference) >= STEPS, (patched, reference)
    if truth is None:
        allowed = RTOL[dtype]
        gap = max(abs(p - r) / abs(r) for p, r in zip(patched, reference))
    else:
        assert len(truth) == len(reference), (truth, reference)
        reference_gap = max(abs(r - t) / abs(t) for r, t in zip(reference, truth))
        allowed = 2 * reference_gap + RTOL[dtype]
        gap = max(abs(p - t) / abs(t) for p, t in zip(patched, truth))
    curves = f"patched {patched}, unpatched {reference}" + (f", fp32 {truth}" if truth else "")
    assert gap <= allowed, f"loss curves differ by {gap:.2e} (allowed {allowed:.1e}): {curves}"
    moved = abs(reference[-1] - reference[0]) / abs(reference[0])
    assert moved > 3 * allowed, (
        f"the loss moved only {moved:.2e} (allowed {allowed:.1e}): the comparison is blind; {curves}"
    )
