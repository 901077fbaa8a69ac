"""optkit.patch under HF's Trainer, with its defaults and the common switches: the patched run's loss curve is
the unpatched run's (per-dtype tolerance, _harness.RTOL) and optkit's fused loss computes every step's loss.

fp16=True is not here: on a machine without a GPU accelerate runs it without autocast (fp16 AMP needs a GPU),
so it would test nothing; fp16 autocast over optkit's functions is tests/integration/test_loops.py's.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

import optkit
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
    token_dataset,
)


def _train(model, out_dir, **switches):
    accumulation = switches.get("gradient_accumulation_steps", 1)
    switches.setdefault("learning_rate", LR)
    switches.setdefault("optim", OPTIM)
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        **switches,
    )
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(STEPS * BATCH * accumulation))
    trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _patched_and_reference(tmp_path, opt, weights="float32", **switches):
    """(trainer, spy, patched curve, unpatched curve, fp32 curve or None): the fp32 run, the same training
    without autocast on the same weight values in fp32, only for mixed precision (see _harness.RTOL)."""
    truth = None
    if switches.get("bf16"):
        plain = {k: v for k, v in switches.items() if k != "bf16"}
        _, truth = _train(add_lora(tiny_hf(weights).float()), tmp_path / "fp32", **plain)
    _, reference = _train(add_lora(tiny_hf(weights)), tmp_path / "reference", **switches)
    spy = FusedLossSpy()
    with spy.watching():
        trainer, patched = _train(optkit.patch(add_lora(tiny_hf(weights)), opt), tmp_path / "patched", **switches)
    return trainer, spy, patched, reference, truth


def test_defaults_keep_the_columns_the_model_takes(tmp_path):
    # remove_unused_columns=True (the default) keeps what the forward's signature names: the patched forward
    # must still name input_ids / attention_mask / labels, and drop the dataset's text column.
    # Trainer's defaults, its AdamW included (_harness says why the other tests use SGD; in fp32 the rounding
    # noise Adam amplifies stays far below the tolerance)
    trainer, spy, patched, reference, _ = _patched_and_reference(
        tmp_path, full_without_rope(), optim="adamw_torch", learning_rate=1e-2
    )
    assert trainer.args.remove_unused_columns
    assert {"input_ids", "attention_mask", "labels"} <= set(trainer._signature_columns)
    assert "source" not in trainer._signature_columns
    assert spy.calls == STEPS, "optkit's fused loss did not compute every step's loss"
    assert_same_curve(patched, reference)
    log = optkit.patch_log(trainer.model)
    assert any(line.startswith("fused_lora: QKV+O fused in 2/2 layers, MLP in 2/2") for line in log), log


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_bf16_autocast_over_fp32_or_bf16_weights(tmp_path, weights):
    trainer, spy, patched, reference, truth = _patched_and_reference(tmp_path, "full", weights, bf16=True)
    assert trainer.accelerator.native_amp, "Trainer(bf16=True) did not autocast: the test would be blind"
    assert spy.calls == STEPS
    assert_same_curve(patched, reference, torch.bfloat16, truth)


def test_gradient_checkpointing(tmp_path):
    trainer, spy, patched, reference, _ = _patched_and_reference(
        tmp_path, full_without_rope(), gradient_checkpointing=True
    )
    assert trainer.model.is_gradient_checkpointing
    assert spy.calls == STEPS  # the loss is outside the checkpointed layers: computed once per step
    assert_same_curve(patched, reference)


def test_gradient_accumulation_normalizes_over_the_accumulated_tokens(tmp_path):
    # Micro-batches hold different numbers of trained tokens (_harness.token_rows), so a loss averaged per
    # micro-batch instead of summed and divided by Trainer's num_items_in_batch gives another curve.
    trainer, spy, patched, reference, _ = _patched_and_reference(
        tmp_path, full_without_rope(), gradient_accumulation_steps=2
    )
    assert trainer.model_accepts_loss_kwargs, "Trainer does not pass num_items_in_batch to the patched forward"
    assert spy.reductions == ["sum"] * (2 * STEPS), spy.reductions
    assert_same_curve(patched, reference)


def test_save_pretrained_reload_and_unpatch(tmp_path):
    from peft import PeftModel

    trainer, _ = _train(optkit.patch(add_lora(tiny_hf()), full_without_rope()), tmp_path / "run")
    model = trainer.model
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_hf(), tmp_path / "adapter")
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, trained[name], rtol=0, atol=0)
    ids = token_dataset(2)["input_ids"]
    ids = torch.tensor(ids)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        patched_logits = model(input_ids=ids).logits
        optkit.unpatch(model)
        unpatched_logits = model(input_ids=ids).logits
        reloaded_logits = reloaded(input_ids=ids).logits
    assert optkit.patch_log(model) == []
    assert not any("forward" in m.__dict__ for m in model.modules()), "unpatch left an instance forward"
    torch.testing.assert_close(unpatched_logits, reloaded_logits, rtol=0, atol=0)
    torch.testing.assert_close(patched_logits, unpatched_logits, rtol=1e-5, atol=1e-5)
