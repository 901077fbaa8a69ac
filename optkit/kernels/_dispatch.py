"""The eager / compiled pair of a kernel with a backward, built once from a short description.

Every such kernel needs the same two front ends over the same two raw launchers:
- for ``torch.compile``, the custom ops ``optkit::<name>_fwd`` and ``optkit::<name>_bwd`` with fake
  (meta) implementations, the forward op's autograd wired to the backward op: Dynamo sees one opaque
  call with known output shapes, so there is no graph break and our kernels run inside the graph;
- for eager calls, a ``torch.autograd.Function`` over the same launchers: its dispatch costs ~10x less
  host time than a custom op's (~12 vs ~150 us measured on CPU), which adds up over hundreds of calls
  per step.
``autograd_op`` builds both and returns a callable that picks the custom op while Dynamo traces and
the Function otherwise. One ``setup_context`` and one ``backward`` serve both front ends, so the two
cannot drift apart: ``backward`` receives the backward launcher (eager) or the backward op (compiled)
as its first argument.

Kernels whose autograd has another shape (cross_entropy's in-place gradient scaling, the fused linear
cross-entropy that recomputes through its own op, nf4's forward-only op) register their ops by hand.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class AutogradOp:
    """A kernel's forward with autograd: ``op(*args)`` runs the custom op under torch.compile and the
    autograd.Function otherwise. ``fwd_op`` / ``bwd_op`` are the custom ops, ``function`` the Function."""

    def __init__(self, fwd_op, bwd_op, function: type[torch.autograd.Function], hidden_outputs: int):
        self.fwd_op, self.bwd_op, self.function = fwd_op, bwd_op, function
        self.hidden_outputs = hidden_outputs

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():  # the custom op is opaque to the graph: no break, our kernels run
            return _visible(self.fwd_op(*args), self.hidden_outputs)
        return self.function.apply(*args)


def _visible(output: Any, hidden_outputs: int) -> Any:
    """The outputs a caller sees: all but the last ``hidden_outputs`` (a lone one unwrapped)."""
    if not hidden_outputs:
        return output
    shown = output[: len(output) - hidden_outputs]
    return shown[0] if len(shown) == 1 else shown


def autograd_op(
    name: str,
    launch_fwd: Callable[..., Any],
    launch_bwd: Callable[..., Any],
    *,
    fake_fwd: Callable[..., Any],
    fake_bwd: Callable[..., Any],
    setup_context: Callable[[Any, tuple, Any], None],
    backward: Callable[..., tuple],
    hidden_outputs: int = 0,
) -> AutogradOp:
    """Register ``optkit::<name>_fwd`` / ``optkit::<name>_bwd`` and build the eager Function.

    ``launch_fwd`` / ``launch_bwd``: the raw launchers; their annotations are the ops' schemas, so they
    must be fully annotated with types a custom op accepts. ``fake_fwd`` / ``fake_bwd``: the same
    signatures, returning empty tensors of the outputs' shapes, dtypes and strides.
    ``setup_context(ctx, inputs, output)``: save what backward needs (``output`` is launch_fwd's whole
    result, hidden outputs included). ``backward(bwd, ctx, *grad_outputs)``: one gradient (or None) per
    forward input, computed by calling ``bwd``; it gets the gradients of the visible outputs only.
    ``hidden_outputs``: how many trailing outputs of launch_fwd only backward uses (e.g. a saved row
    statistic); the caller does not see them and they take no gradient.
    """
    fwd_op = torch.library.custom_op(f"optkit::{name}_fwd", launch_fwd, mutates_args=())
    fwd_op.register_fake(fake_fwd)
    bwd_op = torch.library.custom_op(f"optkit::{name}_bwd", launch_bwd, mutates_args=())
    bwd_op.register_fake(fake_bwd)

    fwd_op.register_autograd(
        lambda ctx, *grad_outputs: backward(bwd_op, ctx, *grad_outputs[: len(grad_outputs) - hidden_outputs]),
        setup_context=setup_context,
    )

    def function_forward(ctx, *args):
        output = launch_fwd(*args)
        setup_context(ctx, args, output)
        return _visible(output, hidden_outputs)

    def function_backward(ctx, *grad_outputs):
        return backward(launch_bwd, ctx, *grad_outputs)

    # Built with type() so that autograd's graph nodes, named after the class when it is created, say
    # which op they belong to (RmsNormFunctionBackward).
    class_name = "".join(word.title() for word in name.split("_")) + "Function"
    function = type(
        class_name,
        (torch.autograd.Function,),
        {"forward": staticmethod(function_forward), "backward": staticmethod(function_backward)},
    )
    return AutogradOp(fwd_op, bwd_op, function, hidden_outputs)
