"""What optkit.patch cannot take says so in one line naming the switch, and training goes on without it:
adapters with dropout or DoRA stay peft's (a warning names the LoraConfig setting), and Triton's interpreter
switched on after triton was imported is refused before any kernel runs.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest

import optkit
from optkit.opt.registry import MissingRequirement
from tests.integration._harness import (
    add_lora,
    assert_same_curve,
    full_without_rope,
    hand_loop,
    one_thread,  # noqa: F401
    tiny_hf,
)


def _optkit_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "optkit" and r.levelno == logging.WARNING]


def test_lora_dropout_stays_with_peft_and_says_which_switch(caplog):
    reference = hand_loop(add_lora(tiny_hf(), dropout=0.1))
    model = add_lora(tiny_hf(), dropout=0.1)
    with caplog.at_level(logging.WARNING, logger="optkit"):
        optkit.patch(model, full_without_rope())
    warnings = _optkit_warnings(caplog)
    assert len(warnings) == 2, warnings  # one line for the attention, one for the MLPs
    assert all("lora_dropout=0.1 > 0" in w and "LoraConfig(lora_dropout=0.0)" in w for w in warnings), warnings
    assert all("\n" not in w for w in warnings)
    log = optkit.patch_log(model)
    assert any(line.startswith("fused_lora: QKV+O fused in 0/2 layers, MLP in 0/2") for line in log), log
    # the same dropout masks are drawn (optkit's kernels draw no random numbers), so the curves agree
    assert_same_curve(hand_loop(model), reference)


def test_dora_stays_with_peft_and_says_which_switch(caplog):
    model = add_lora(tiny_hf(), use_dora=True)
    with caplog.at_level(logging.WARNING, logger="optkit"):
        optkit.patch(model, full_without_rope())
    warnings = _optkit_warnings(caplog)
    assert warnings and all("LoraConfig(use_dora=False)" in w for w in warnings), warnings


def test_interpreter_switched_on_after_triton_was_imported(monkeypatch):
    # What a script gets that sets TRITON_INTERPRET=1 after importing transformers (which imports triton):
    # triton's own helpers stay compiled. Faked here, as this process set the variable in time.
    class JITFunction:  # the class triton decorates its helpers with when the interpreter is off
        pass

    late = types.ModuleType("triton.language.standard")
    late.sum = JITFunction()
    monkeypatch.setitem(sys.modules, "triton.language.standard", late)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = tiny_hf()
    with pytest.raises(MissingRequirement, match="set it before importing transformers") as error:
        optkit.patch(model, "full")
    assert "\n" not in str(error.value)
    assert optkit.patch_log(model) == []
