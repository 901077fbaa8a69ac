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
the table apply instead. ``check_forward_backward(fused, reference, inputs, dtype)`` applies the rule to
an op's outputs and to the gradients of every input that requires grad.

Why the slack is one ulp: the CPU interpreter (Triton 3.x) converts fp32 -> bf16 by truncation, not
round-to-nearest as the GPU does, so under the interpreter a bf16 store can be off by up to one ulp
where eager PyTorch is off by half of one. One ulp of slack at the reference's scale absorbs exactly
that; fp16 conversions round to nearest in both places.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

# Where the kernel tests run: the GPU when there is one (compiled Triton), else the CPU interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
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
    torch_same_dtype_out: torch.Tensor | None,
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


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def _leaves(inputs: Sequence[torch.Tensor], dtype: torch.dtype | None) -> list[torch.Tensor]:
    """Fresh leaves with the inputs' values, strides (clone keeps them) and requires_grad."""
    out = []
    for t in inputs:
        copy = t.detach().clone() if dtype is None else t.detach().to(dtype)
        out.append(copy.requires_grad_(t.requires_grad))
    return out


def check_forward_backward(
    fused: Callable,
    reference: Callable,
    inputs: Sequence[torch.Tensor],
    dtype: torch.dtype,
    seed: int = 0,
) -> None:
    """Hold ``fused(*inputs)`` and the gradients of every input that requires grad to the rule above.

    ``reference`` runs twice: on float64 upcasts of the inputs (the truth) and on copies in their own
    dtypes (plain PyTorch's error, which sets the bar). All three backward passes get the same upstream
    gradients: random, rounded to the output dtype. ``dtype`` picks the tolerance row (the coarsest
    dtype involved).
    """
    fused_in, ref64_in, same_in = _leaves(inputs, None), _leaves(inputs, torch.float64), _leaves(inputs, None)
    fused_out, ref64_out, same_out = (
        _as_tuple(fused(*fused_in)),
        _as_tuple(reference(*ref64_in)),
        _as_tuple(reference(*same_in)),
    )
    assert len(fused_out) == len(ref64_out), "fused and reference return different numbers of outputs"
    gen = torch.Generator().manual_seed(seed)
    upstream = [
        torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=o.device, dtype=o.dtype) for o in fused_out
    ]
    for i, (f, r, s) in enumerate(zip(fused_out, ref64_out, same_out)):
        assert f.dtype == s.dtype, f"output {i}: dtype {f.dtype} but plain PyTorch gives {s.dtype}"
        assert_close_to_reference(f, r, s, dtype, name=f"output {i}")
    wrt = [i for i, t in enumerate(inputs) if t.requires_grad]
    if not wrt:
        return

    def grads(outs, leaves, cast):
        return torch.autograd.grad(outs, [leaves[i] for i in wrt], [cast(g, o) for g, o in zip(upstream, outs)])

    fused_g = grads(fused_out, fused_in, lambda g, o: g)
    ref64_g = grads(ref64_out, ref64_in, lambda g, o: g.double())
    same_g = grads(same_out, same_in, lambda g, o: g.to(o.dtype))
    for i, f, r, s in zip(wrt, fused_g, ref64_g, same_g):
        assert f.dtype == inputs[i].dtype, f"grad of input {i}: dtype {f.dtype}, input is {inputs[i].dtype}"
        assert_close_to_reference(f, r, s, dtype, name=f"grad of input {i}")


# torch.library.opcheck's checks minus "test_aot_dispatch_dynamic" (seconds per op under the interpreter;
# the compile tests run the ops through AOTAutograd anyway).
OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def check_compiles_fullgraph(fn: Callable, inputs: Sequence[torch.Tensor], backend: str, op_name: str) -> None:
    """``torch.compile(fn, fullgraph=True)`` runs (no graph break), calls ``torch.ops.optkit.<op_name>``
    and gives eager's loss and input gradients. ``fn`` returns a scalar loss."""
    wrt = [t for t in inputs if t.requires_grad]
    eager_loss = fn(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, wrt)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    torch._dynamo.reset()
    loss = torch.compile(fn, backend=recording_backend, fullgraph=True)(*inputs)
    grads = torch.autograd.grad(loss, wrt)
    assert any(f"optkit.{op_name}" in g for g in graphs), f"the compiled graph does not call optkit.{op_name}"
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def check_module_matches(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> None:
    """``ours`` (a drop-in sharing ``theirs``' parameters) holds to the rule with ``theirs`` as the
    reference: the output and the gradients of x and of every parameter that requires grad."""
    params = dict(theirs.named_parameters())
    assert set(dict(ours.named_parameters())) == set(params), "the drop-in does not expose the same parameters"

    def call(module):
        return lambda x, *ps: torch.func.functional_call(module, dict(zip(params, ps)), (x,))

    check_forward_backward(call(ours), call(theirs), [x, *params.values()], dtype)


# torch.compile backends for the no-graph-break tests: aot_eager wherever the tests run, inductor on the GPU.
COMPILE_BACKENDS = pytest.mark.parametrize(
    "backend, device", [("aot_eager", DEVICE), pytest.param("inductor", "cuda", marks=pytest.mark.gpu)]
)
