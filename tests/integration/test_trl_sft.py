"""optkit.patch under TRL's SFTTrainer: its default SFTConfig (bf16 autocast, gradient checkpointing), packing
and padding-free batches, optkit patched before or after the trainer is built.

TRL computes the loss with its own fused LM head (``model(..., fused_lm_head=True)``, which also returns the
per-token entropy and accuracy it logs), so optkit's fused loss must not run there and optkit must say so in
one line; everything else optkit patched runs, and the loss curve is the unpatched run's. packing and
padding_free run in fp32 (their own switches, not autocast's, are under test; that is the default's test).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from trl import SFTConfig, SFTTrainer

import optkit
from optkit.train.packing import packing_state
from tests.integration._harness import (
    BATCH,
    LR,
    OPTIM,
    STEPS,
    FusedLossSpy,
    add_lora,
    assert_same_curve,
    full_without_rope,
    one_thread,  # noqa: F401
    tiny_hf,
)

TRL_NOTE = "fused_linear_cross_entropy: not used for calls with fused_lm_head=True (TRL's SFTTrainer)"


def _example_utils():
    path = Path(__file__).resolve().parents[2] / "examples" / "example_utils.py"
    spec = importlib.util.spec_from_file_location("example_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLES = _example_utils()  # the examples' byte tokenizer and text: a real tokenizer, nothing downloaded


def _sft(model, out_dir, patch_after=None, **config):
    args = SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        learning_rate=LR,
        optim=OPTIM,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        **config,
    )
    texts = EXAMPLES.text_dataset(STEPS * BATCH * 2, n_chars=10)
    trainer = SFTTrainer(model=model, args=args, train_dataset=texts, processing_class=EXAMPLES.byte_tokenizer())
    if patch_after is not None:
        optkit.patch(trainer.model, patch_after)
    trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _assert_trl_head_and_optkit_ran(trainer, spy):
    log = optkit.patch_log(trainer.model)
    assert spy.calls == 0, "optkit's fused loss ran under SFTTrainer, which uses TRL's fused LM head"
    assert any(line.startswith(TRL_NOTE) for line in log), log
    assert any(line.startswith("fused_lora: QKV+O fused in 2/2 layers, MLP in 2/2") for line in log), log


def test_default_sft_config(tmp_path):
    defaults = SFTConfig(output_dir=str(tmp_path), use_cpu=True)
    assert defaults.bf16 and defaults.gradient_checkpointing  # what "TRL's defaults" means in this test
    _, truth = _sft(add_lora(tiny_hf()), tmp_path / "fp32", bf16=False)
    _, reference = _sft(add_lora(tiny_hf()), tmp_path / "reference")
    spy = FusedLossSpy()
    with spy.watching():
        trainer, patched = _sft(optkit.patch(add_lora(tiny_hf()), "full"), tmp_path / "patched")
    assert trainer.accelerator.native_amp and trainer.model.is_gradient_checkpointing
    _assert_trl_head_and_optkit_ran(trainer, spy)
    assert_same_curve(patched, reference, torch.bfloat16, truth)


@pytest.mark.parametrize(
    "switch, patch_after_trainer",
    [({"packing": True, "max_length": 24}, False), ({"padding_free": True, "max_length": None}, True)],
    ids=["packing", "padding_free-patched-after-SFTTrainer"],
)
def test_packing_and_padding_free(tmp_path, switch, patch_after_trainer):
    _, reference = _sft(add_lora(tiny_hf()), tmp_path / "reference", bf16=False, **switch)
    spy = FusedLossSpy()
    model = add_lora(tiny_hf())
    if not patch_after_trainer:
        optkit.patch(model, full_without_rope())
    with spy.watching():
        trainer, patched = _sft(
            model, tmp_path / "patched", full_without_rope() if patch_after_trainer else None, bf16=False, **switch
        )
    _assert_trl_head_and_optkit_ran(trainer, spy)
    # rows arrive packed (position_ids restart per example, no attention mask): optkit's packed attention
    # built their boundaries once per forward
    assert packing_state(trainer.model)["stats"].per_batch_builds >= STEPS
    assert_same_curve(patched, reference)
