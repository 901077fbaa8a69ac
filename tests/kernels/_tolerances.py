"""The numerical bar every kernel test holds its results to, stated once per dtype.

Every tensor a test compares (an output, each input's gradient) is judged against a float64
reference computed on the same (upcast) inputs, by two rules that both scale with *that tensor's
own* reference, never with a floor of 1 (a mean-reduced gradient over 4k tokens is ~1e-4 per
element; an absolute floor would let a zero gradient pass):

1. Relative norm error: ``||out - ref|| / ||ref|| <= norm_rtol[dtype]`` (or ``ERROR_RATIO`` x plain
   PyTorch's own, where that is larger: a tensor that is a cancellation residue, which no implementation
   in the dtype gets to ``norm_rtol``). A zero gradient scores 1, a halved one 0.5, a sign-flipped one 2:
   every ``norm_rtol`` below is far under 0.5, so each of them fails at every size and dtype wherever
   plain PyTorch computes the tensor to better than 25%.
2. Elementwise, flash-attention's rule: compare the fused result and plain PyTorch *in the same dtype*
   against the reference; the fused max error may be at most ``ERROR_RATIO`` times PyTorch's own plus
   ``ulp[dtype] * max|ref|`` (one unit in the last place at the reference's largest magnitude). Without
   a same-dtype PyTorch result (``torch_same_dtype_out=None``) the bound is ``rtol * |ref| + ulp *
   max|ref|`` per element.

A reference that is exactly zero everywhere (a gradient of fully ignored tokens) has no scale: the
result must then be as exact as plain PyTorch's (or exactly zero without one).

Per-dtype tolerances (the ``TOLERANCES`` table; eps = 2^-mantissa: fp32 1.2e-7, fp16 9.8e-4, bf16 7.8e-3):

    dtype     norm_rtol   ulp      rtol (no same-dtype result)
    float32   1e-5        2e-6     1e-5
    float16   5e-3        1e-3     8e-3
    bfloat16  5e-2        8e-3     6e-2

``ulp`` is about one eps (fp32: ~16 eps, because summation order alone moves a long fp32 sum that
much). ``norm_rtol`` is a few eps for one rounding per element; bf16 gets ~6 eps for the whole-model
gradients of tests/opt (several bf16 matmuls deep: up to 2% seen on the tiny models), still 10x under a
halved gradient.

Why one ulp of slack: the CPU interpreter (Triton 3.x) converts fp32 -> bf16 by truncation, not
round-to-nearest as the GPU does, so under the interpreter a bf16 store can be off by up to one ulp
where eager PyTorch is off by half of one; fp16 conversions round to nearest in both places.

Usage (tests/kernels/test_*.py):

    from tests.kernels._tolerances import assert_close_to_reference
    ref64 = reference_op(x.double())            # what the test trusts
    torch_out = reference_op(x)                 # plain PyTorch in x's dtype
    assert_close_to_reference(fused_out, ref64, torch_out, x.dtype)

``check_forward_backward(fused, reference, inputs, dtype)`` applies both rules to an op's outputs and to
the gradients of every input that requires grad. ``tests/kernels/test_tolerances.py`` proves the bar
rejects zero, halved and sign-flipped gradients of mean-reduced losses at large token counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

# Where the kernel tests run: the GPU when there is one (compiled Triton), else the CPU interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ERROR_RATIO = 2.0  # fused max error <= ERROR_RATIO x (plain PyTorch's in the same dtype) + one ulp


@dataclass(frozen=True)
class DtypeTolerance:
    norm_rtol: float  # bound on ||out - ref|| / ||ref||
    ulp: float  # elementwise slack, in units of max|ref| of the tensor itself
    rtol: float  # elementwise relative tolerance, used only when no same-dtype PyTorch result is given


TOLERANCES = {
    torch.float32: DtypeTolerance(norm_rtol=1e-5, ulp=2e-6, rtol=1e-5),
    torch.float16: DtypeTolerance(norm_rtol=5e-3, ulp=1e-3, rtol=8e-3),
    torch.bfloat16: DtypeTolerance(norm_rtol=5e-2, ulp=8e-3, rtol=6e-2),
}


@dataclass(frozen=True)
class Errors:
    """How far a result is from its float64 reference, and the two bounds it is held to."""

    max_error: float
    max_bound: float
    norm_error: float  # ||out - ref|| / ||ref|| (inf when ref is zero and out is not)
    norm_bound: float

    @property
    def ok(self) -> bool:
        return self.max_error <= self.max_bound and self.norm_error <= self.norm_bound


def measure_errors(
    out: torch.Tensor, ref64: torch.Tensor, torch_same_dtype_out: torch.Tensor | None, dtype: torch.dtype
) -> Errors:
    """Both rules of the module docstring for one tensor (``ref64`` float64, same shape as ``out``)."""
    tol = TOLERANCES[dtype]
    diff = out.double() - ref64
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    max_error = diff.abs().max().item() if ref64.numel() else 0.0
    if torch_same_dtype_out is None:
        excess = diff.abs() - (tol.rtol * ref64.abs() + tol.ulp * scale)
        worst = excess.max().item() if excess.numel() else 0.0
        max_bound = max_error - worst  # the bound at the worst element: max_error > max_bound iff it is exceeded
    else:
        torch_diff = torch_same_dtype_out.to(device=ref64.device, dtype=torch.float64) - ref64
        torch_error = torch_diff.abs().max().item() if ref64.numel() else 0.0
        max_bound = ERROR_RATIO * torch_error + tol.ulp * scale
    ref_norm = ref64.norm().item()
    if not ref_norm:  # a zero reference has no scale to be relative to: the elementwise rule alone decides
        return Errors(max_error, max_bound, 0.0, float("inf"))
    norm_error = diff.norm().item() / ref_norm
    norm_bound = tol.norm_rtol
    if torch_same_dtype_out is not None:
        # A tensor that is a cancellation residue (RMSNorm's input gradient over a row of one or two columns
        # is ~eps, not ~1): plain PyTorch in the dtype misses it by as much, and the bar is ERROR_RATIO x its
        # miss. For a well-conditioned tensor PyTorch's own error is a few eps, far under a zeroed gradient's 1.
        torch_norm_error = (torch_same_dtype_out.to(ref64.device, torch.float64) - ref64).norm().item() / ref_norm
        norm_bound = max(norm_bound, ERROR_RATIO * torch_norm_error)
    return Errors(max_error, max_bound, norm_error, norm_bound)


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
    errors = measure_errors(out, ref64, torch_same_dtype_out, dtype)
    assert errors.norm_error <= errors.norm_bound, (
        f"{name} ({dtype}): relative norm error {errors.norm_error:.3e} > {errors.norm_bound:g}"
    )
    rule = "rtol x |ref|" if torch_same_dtype_out is None else f"{ERROR_RATIO} x PyTorch's"
    assert errors.max_error <= errors.max_bound, (
        f"{name} ({dtype}): max error {errors.max_error:.3e} > {errors.max_bound:.3e} ({rule} + "
        f"{TOLERANCES[dtype].ulp:g} x max|ref|)"
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
