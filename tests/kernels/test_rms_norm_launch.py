"""RMSNorm launched with chosen configs (what scripts/tune_kernels.py sweeps) against the float64 reference.

Tolerances: tests/kernels/_tolerances.py (fused error <= 2x plain PyTorch's in the same dtype + 1 ulp).
"""

import pytest
import torch

from optkit.kernels.rms_norm import (
    RmsNormLaunch,
    default_rms_norm_launch,
    launch_rms_norm_bwd,
    launch_rms_norm_fwd,
    reference_rms_norm,
)
from tests.kernels._tolerances import DEVICE, assert_close_to_reference

LAUNCHES = [
    RmsNormLaunch(rows_per_program=1, num_warps=1),
    RmsNormLaunch(rows_per_program=4, num_warps=2, programs_per_sm=1),  # 4 does not divide the 7 rows
    RmsNormLaunch(rows_per_program=8, num_warps=4, programs_per_sm=8),
]


@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("dtype, cast_mode", [(torch.float32, "llama"), (torch.bfloat16, "gemma")])
def test_every_launch_config_matches_the_reference(launch, dtype, cast_mode):
    gen = torch.Generator().manual_seed(11)
    offset = 1.0 if cast_mode == "gemma" else 0.0
    x = torch.randn(7, 48, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(48, generator=gen) * 0.1 + (0.0 if offset else 1.0)).to(DEVICE, dtype)
    dy = torch.randn(7, 48, generator=gen).to(DEVICE, dtype)

    y, rstd = launch_rms_norm_fwd(x, weight, 1e-6, offset, cast_mode == "llama", launch)
    dx, dw = launch_rms_norm_bwd(dy, x, weight, rstd, offset, cast_mode == "llama", True, launch)

    def reference(dtype_of):
        xs, ws = x.to(dtype_of).requires_grad_(), weight.to(dtype_of).requires_grad_()
        out = reference_rms_norm(xs, ws, 1e-6, offset, cast_mode)
        return (out, *torch.autograd.grad(out, (xs, ws), dy.to(out.dtype)))

    for name, got, ref64, same in zip(("y", "dx", "dw"), (y, dx, dw), reference(torch.float64), reference(dtype)):
        assert_close_to_reference(got, ref64, same, dtype, name=f"{name} with {launch}")


def test_default_launch_follows_the_shape():
    assert default_rms_norm_launch(4096, 4096) == RmsNormLaunch(rows_per_program=1, num_warps=8)
    assert default_rms_norm_launch(4096, 128).rows_per_program == 32  # short rows stacked to ~4096 elements
