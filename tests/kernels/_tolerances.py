"""The numerical bar every kernel test holds its results to, stated once per dtype.

The rule is flash-attention's: compare the fused result and plain PyTorch *in the same dtype*
against a float64 reference computed on the same (upcast) inputs; the fused error may be at most
``ERROR_RATIO`` times PyTorch's own error, plus a small absolute slack for results PyTorch happens to
get (nearly) exact. This scales with the dtype and the op instead of loosening numbers by hand: a
bf16 kernel is allowed bf16-sized errors, never more than twice what eager PyTorch makes.

The slack is relative to the reference's magnitude (``atol * max(1, max|ref|)``), so one number per
dtype serves outputs near 1 and weight gradients summed over thousands of rows alike.

Usage (tests/kernels/test_*.py):

    from tests.kernels._tolerances import assert_close_to_reference
    ref64 = reference_op(x.double())            # what the test trusts
    torch_out = reference_op(x)                 # plain PyTorch in x's dtype
    assert_close_to_reference(fused_out, ref64, torch_out, x.dtype)

Without a same-dtype PyTorch result (``torch_same_dtype_out=None``) the fixed ``rtol``/``atol`` of
the table apply instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

ERROR_RATIO = 2.0  # fused error <= ERROR_RATIO x (plain PyTorch error in the same dtype) + slack


@dataclass(frozen=True)
class DtypeTolerance:
    atol: float  # slack, in units of max(1, max|ref|), added to the ratio rule
    rtol: float  # fixed relative tolerance, used only when no same-dtype PyTorch result is given


# atol: one unit in the last place at the reference's largest magnitude (eps: fp32 1.2e-7, fp16
# 9.8e-4, bf16 7.8e-3; fp32 gets ~16 ulp because summation order alone moves a long fp32 sum that
# much). rtol: about 8 ulp, what a one-rounding kernel comfortably meets on O(1) values.
TOLERANCES = {
    torch.float32: DtypeTolerance(atol=2e-6, rtol=1e-5),
    torch.float16: DtypeTolerance(atol=1e-3, rtol=8e-3),
    torch.bfloat16: DtypeTolerance(atol=8e-3, rtol=6e-2),
}


def _max_abs_error(value: torch.Tensor, ref64: torch.Tensor) -> float:
    return (value.double() - ref64).abs().max().item() if ref64.numel() else 0.0


def assert_close_to_reference(
    out: torch.Tensor,
    ref64: torch.Tensor,
    torch_same_dtype_out: Optional[torch.Tensor],
    dtype: torch.dtype,
    name: str = "output",
) -> None:
    """Fail unless ``out`` is as close to the float64 ``ref64`` as ``dtype`` allows (see module doc)."""
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for {dtype}; the table covers {list(TOLERANCES)}")
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    ref64 = ref64.to(device=out.device, dtype=torch.float64)
    assert torch.isfinite(ref64).all(), f"{name}: the reference itself is not finite; fix the test inputs"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the result"
    tol = TOLERANCES[dtype]
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    fused_err = _max_abs_error(out, ref64)
    if torch_same_dtype_out is None:
        allowed = (tol.rtol * ref64.abs() + tol.atol * scale).double()
        excess = (out.double() - ref64).abs() - allowed
        worst = excess.max().item() if excess.numel() else 0.0
        assert worst <= 0, f"{name} ({dtype}): max error {fused_err:.3e} exceeds rtol={tol.rtol} atol={tol.atol}"
        return
    torch_err = _max_abs_error(torch_same_dtype_out, ref64)
    bound = ERROR_RATIO * torch_err + tol.atol * scale
    assert fused_err <= bound, (
        f"{name} ({dtype}): fused max error {fused_err:.3e} > {ERROR_RATIO} x PyTorch's {torch_err:.3e}"
        f" + {tol.atol:g} x scale {scale:.3g} = {bound:.3e}"
    )
