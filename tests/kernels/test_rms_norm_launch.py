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
    assert default_rms_norm_launch(4096, 4096) == RmsNormLaunch(rows_per_program=2, num_warps=8, programs_per_sm=2)
    assert default_rms_norm_launch(4096, 128).rows_per_program == 32  # short rows stacked to ~4096 elements


def _tune_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "tune_kernels.py"
    spec = importlib.util.spec_from_file_location("tune_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tuning_script_times_every_config_and_the_default(tmp_path, capsys):
    """scripts/tune_kernels.py --cpu-smoke: the plumbing on tiny shapes (its numbers mean nothing on the CPU)."""
    import json

    tune = _tune_script()
    assert tune.main(["--cpu-smoke", "--json", str(tmp_path / "tune.json")]) == 0
    lines = json.loads((tmp_path / "tune.json").read_text())["lines"]
    assert all(line["error"] is None and line["ms"] > 0 for line in lines), [x["error"] for x in lines]
    passes = {(line["op"], line["kernel_pass"]) for line in lines}
    assert passes == {
        ("rms_norm", "fwd"),
        ("rms_norm", "bwd"),
        ("rope", "fwd"),
        ("rope", "bwd"),
        ("rope", "fwd in place"),
    }
    for key in passes:  # every (op, pass) has its default as the reference
        assert sum(line["default"] for line in lines if (line["op"], line["kernel_pass"]) == key) == 1, key
    assert "copy bandwidth" in capsys.readouterr().out


def test_tuning_table_names_the_configs_that_beat_the_default():
    tune = _tune_script()
    line = {"op": "rope", "shape": "T4096", "kernel_pass": "fwd", "error": None}
    lines = [
        dict(line, config={"num_warps": 8}, default=True, ms=0.20, pct_copy=78.0),
        dict(line, config={"num_warps": 4}, default=False, ms=0.17, pct_copy=92.0),
        dict(line, kernel_pass="bwd", config={"num_warps": 8}, default=True, ms=0.2, pct_copy=78.0),
    ]
    table = tune.format_lines(lines, 3000.0)
    assert "rope T4096 fwd: 78% -> 92% of copy (1.18x) with num_warps=4" in table
    assert "bwd:" not in table.split("where a config beats the default:")[1], "the default is the fastest there"
