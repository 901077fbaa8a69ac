"""train.optimizer: every choice builds from the config and takes Adam's first step.

Adam's first step is independent of the gradient's scale: with bias correction, m/sqrt(v) = g/|g|,
so each parameter moves by lr * sign(g) (minus decoupled weight decay). That closed form is the
reference; 8-bit states quantize m and v, which the first step's ratio survives to ~1% (bound 2%).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from omegaconf import OmegaConf

from optkit.config.schema import OPTIMIZERS
from optkit.train.optimizers import build_optimizer

LR, WEIGHT_DECAY = 1e-2, 0.1
# in units of LR; torch's 1e-4 x LR = 1e-6 is two float32 ulps of the O(4) parameter values
# adamw_8bit_fused moves parameters by the unquantized fp32 moments (only the stored state is 8-bit): torch's bar
RTOL = {"adamw": 1e-4, "adamw_fused": 1e-4, "adamw_8bit": 2e-2, "paged_adamw_8bit": 2e-2, "adamw_8bit_fused": 1e-4}


def _cfg(name):
    return OmegaConf.create({"optimizer": name, "lr": LR, "weight_decay": WEIGHT_DECAY})


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_first_step_is_lr_times_sign_of_grad(name):
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        pytest.importorskip("bitsandbytes")
    gen = torch.Generator().manual_seed(0)
    # 8192 elements: above bitsandbytes' min_8bit_size (4096), so the 8-bit state path is the one tested
    param = torch.nn.Parameter(torch.randn(64, 128, generator=gen))
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    grad = torch.randn(64, 128, generator=gen)
    grad[grad.abs() < 1e-2] = 1e-2  # keep |g| >> eps so the sign form is exact
    start = param.detach().clone()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        opt = build_optimizer([param, frozen], _cfg(name))
        assert sum(len(g["params"]) for g in opt.param_groups) == 1  # frozen parameters are left out
        param.grad = grad
        opt.step()
    if name.endswith("8bit"):
        assert opt.state[param]["state1"].dtype == torch.uint8  # the moments really are 8-bit
    if name == "adamw_8bit_fused":
        assert opt.state[param]["m_codes"].dtype == opt.state[param]["v_codes"].dtype == torch.uint8
    expected = start * (1 - LR * WEIGHT_DECAY) - LR * grad.sign()
    torch.testing.assert_close(param.detach(), expected, rtol=0, atol=RTOL[name] * LR)


def test_unknown_optimizer_and_no_trainable_params_say_what_to_do():
    param = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="adamw_fused"):
        build_optimizer([param], _cfg("sgd"))
    with pytest.raises(ValueError, match="train.method"):
        build_optimizer([torch.nn.Parameter(torch.ones(2), requires_grad=False)], _cfg("adamw"))
