"""optkit.patch in hand-written loops: accelerate's Accelerator.prepare + accelerator.backward (no mixed
precision, and bf16, which wraps the model's forward in autocast), and a plain loop under torch.autocast in
bf16 and fp16 over fp32 and bf16 weights (fp16 autocast is only reachable this way without a GPU).
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import optkit
from tests.integration._harness import (
    STEPS,
    FusedLossSpy,
    add_lora,
    assert_same_curve,
    full_without_rope,
    hand_loop,
    one_thread,  # noqa: F401
    tiny_hf,
)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; each Accelerator here picks its own mixed precision."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _accelerator(mixed_precision: str) -> Accelerator:
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True, mixed_precision=mixed_precision)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerator_prepare_and_backward(mixed_precision):
    opt = "full" if mixed_precision == "bf16" else full_without_rope()
    truth = hand_loop(add_lora(tiny_hf())) if mixed_precision == "bf16" else None
    reference = hand_loop(add_lora(tiny_hf()), accelerator=_accelerator(mixed_precision))
    spy = FusedLossSpy()
    accelerator = _accelerator(mixed_precision)
    with spy.watching():
        patched = hand_loop(optkit.patch(add_lora(tiny_hf()), opt), accelerator=accelerator)
    assert accelerator.native_amp == (mixed_precision == "bf16")
    assert spy.calls == STEPS
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    assert_same_curve(patched, reference, dtype, truth)


@pytest.mark.parametrize(
    "dtype, weights",
    [(torch.bfloat16, "float32"), (torch.float16, "float32"), (torch.float16, "bfloat16")],
    ids=["bf16-over-fp32", "fp16-over-fp32", "fp16-over-bf16"],
)
def test_hand_loop_under_autocast(dtype, weights):
    truth = hand_loop(add_lora(tiny_hf(weights).float()))
    reference = hand_loop(add_lora(tiny_hf(weights)), autocast=dtype)
    model = optkit.patch(add_lora(tiny_hf(weights)), "full")
    layer = model.get_base_model().model.layers[0]
    seen = {}  # fused LoRA's outputs come in the autocast dtype, as an autocast linear's would

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, output.dtype)

        return hook

    layer.self_attn.q_proj.register_forward_hook(record("q_proj"))
    layer.mlp.register_forward_hook(record("mlp"))
    spy = FusedLossSpy()
    with spy.watching():
        patched = hand_loop(model, autocast=dtype)
    assert seen == {"q_proj": dtype, "mlp": dtype}, seen
    assert spy.calls == STEPS
    assert_same_curve(patched, reference, dtype, truth)
