"""The implementations the kernels suite times against each other, resolved to a callable per case and
dtype: optkit's Triton kernels, eager PyTorch (optkit/bench/kernels/cases.py), torch.compile of that eager
code, Liger-Kernel and, for nf4_dequantize, bitsandbytes (peers, never dependencies). Each resolves to
``call(**inputs) -> Tensor | tuple of Tensors``, or raises ``ImplUnavailable``, which becomes a skipped
row: a peer not installed, or an impl the op's ``OpSpec.not_applicable`` rules out (torch.compile and
Liger for nf4_dequantize).

Defaults only (e.g. not cross_entropy's overwrite_logits): correctness lives in tests/kernels. Impls of
one op only (``OP_IMPLS``): nf4_dequantize's ``bitsandbytes`` (``functional.dequantize_4bit``, what
QLoRA runs); and a sweep: fused_linear_cross_entropy also runs as ``optkit-c256``, ``optkit-c512`` and
``optkit-c2048`` (``chunk_rows`` fixed; plain ``optkit`` picks 1024 at the suite's shape), to show chunk
size against speed and peak memory; rope's ``optkit-inplace`` (``apply_rotary(..., inplace=True)``).

Fused cross-entropy implementations (optkit and its chunk sweep, Liger) compute the gradient inside
forward: their fwd_ms holds backward work and their bwd_ms is a mere scale, so the row says
``loss_in_forward`` and they are compared on ``full_ms`` / ``full_device_ms`` only.

torch.compile compiles each op once per non-token shape with the token dimension marked dynamic
(as training with varying sequence lengths sees it), so token sweeps reuse one compiled graph and
the suite fits its time budget (< 5 min on an H100, quick mode < 90 s). Dynamo is reset between
shapes so that a second hidden size never turns the feature dimension dynamic; the device pass,
which revisits the shapes, compiles each once more (Inductor's caches make that quick).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from optkit.bench.kernels.cases import FLCE, IGNORE_INDEX, NF4, Case
from optkit.bench.kernels.ops import OpSpec, nf4_quant_state

IMPLS = ("optkit", "eager", "compile", "liger")  # every op (a skipped row where one does not apply)
BITSANDBYTES = "bitsandbytes"
# FLCE's chunk-size sweep: optkit with fixed rows per chunk (its default is 1024 at the suite's shape;
# Liger budgets 256 rows here). Fewer rows: a smaller logits buffer, more grad_weight traffic.
CHUNK_IMPLS: Dict[str, int] = {f"optkit-c{rows}": rows for rows in (256, 512, 2048)}
# RoPE written over q and k (and the gradients over the incoming ones), as optkit's HF patch runs it and
# as Liger's RoPE always does; plain ``optkit`` is the out-of-place op.
ROPE_INPLACE = "optkit-inplace"
OP_IMPLS: Dict[str, Tuple[str, ...]] = {
    NF4: (BITSANDBYTES,),
    FLCE: tuple(CHUNK_IMPLS),
    "rope": (ROPE_INPLACE,),
}  # impls of one op
ALL_IMPLS = IMPLS + (BITSANDBYTES,) + tuple(CHUNK_IMPLS) + (ROPE_INPLACE,)


class ImplUnavailable(Exception):
    """This implementation cannot run here (not installed, wrong device, not applicable to the op); becomes a
    skipped row."""


def impls_for(op: str, impls: Sequence[str]) -> List[str]:
    """The impls of ``impls`` that have a row for ``op``: every op's, and those of ``OP_IMPLS[op]``."""
    return [impl for impl in impls if impl in IMPLS or impl in OP_IMPLS.get(op, ())]


def computes_grad_in_forward(spec: OpSpec, impl: str) -> bool:
    return spec.fused_loss and (impl == "liger" or impl.startswith("optkit"))


def _nf4_call(fn: Callable, case: Case, dtype: torch.dtype) -> Callable:
    """``fn(weight_packed, quant_state)`` on the case's inputs. The QuantState is rebuilt around each
    repeat's fresh tensors: two small Python objects, a host cost every nf4 impl pays alike."""

    def call(weight_packed, **state_tensors):
        return fn(weight_packed, nf4_quant_state(case, dtype, **state_tensors))

    return call


def _optkit_call(
    spec: OpSpec, case: Case, dtype: torch.dtype, chunk_rows: Optional[int] = None, inplace: bool = False
) -> Callable:
    module_name = f"optkit.kernels.{spec.name}"
    try:
        fn = getattr(importlib.import_module(module_name), spec.optkit_fn)
    except (ImportError, AttributeError) as exc:
        raise ImplUnavailable(f"{module_name}.{spec.optkit_fn} is not importable: {exc}") from None
    if spec.name == NF4:
        return _nf4_call(fn, case, dtype)
    params = dict(case.params)
    if spec.name == "rms_norm":
        return lambda x, weight: fn(
            x, weight, eps=params["eps"], offset=params["offset"], cast_mode=params["cast_mode"]
        )
    if spec.name in ("cross_entropy", FLCE):
        extra = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
        return lambda **t: fn(**t, ignore_index=IGNORE_INDEX, reduction="mean", softcap=params["softcap"], **extra)
    if inplace:
        return lambda **t: fn(**t, **params, inplace=True)
    return lambda **t: fn(**t, **params)


def _eager_call(spec: OpSpec, case: Case, dtype: torch.dtype) -> Callable:
    if spec.name == NF4:
        return _nf4_call(spec.eager, case, dtype)
    params = dict(case.params)

    def call(**tensors):
        return spec.eager(**tensors, **params)

    return call


def _liger_call(spec: OpSpec, case: Case, device: torch.device) -> Callable:
    if device.type != "cuda":
        raise ImplUnavailable("Liger-Kernel runs on CUDA only")
    try:
        functional = importlib.import_module("liger_kernel.transformers.functional")
    except ImportError as exc:
        raise ImplUnavailable(
            f"liger-kernel is not importable ({exc}); it is a peer, never a dependency: "
            "pip install liger-kernel to compare against it"
        ) from None
    fn = getattr(functional, spec.liger_fn, None)
    if fn is None:
        raise ImplUnavailable(f"this liger-kernel has no liger_kernel.transformers.functional.{spec.liger_fn}")
    p = case.params
    if spec.name == "rms_norm":
        # in_place left at Liger's default, as LigerRMSNorm users get it (dy is fresh every repeat)
        return lambda x, weight: fn(x, weight, p["eps"], offset=p["offset"], casting_mode=p["cast_mode"])
    if spec.name == "rope":  # Liger wants cos/sin as (1 or B, S, D)
        return lambda q, k, cos, sin: fn(q, k, cos.unsqueeze(0), sin.unsqueeze(0))
    if spec.name == "geglu":
        if p.get("approximate") != "tanh":
            raise ImplUnavailable("Liger's GEGLU computes the tanh approximation only")
        return lambda gate, up: fn(gate, up)
    loss_kwargs = {"ignore_index": IGNORE_INDEX, "reduction": "mean", "softcap": p.get("softcap")}
    if spec.name == "cross_entropy":
        return lambda logits, target: fn(logits, target, **loss_kwargs)
    if spec.name == "fused_linear_cross_entropy":
        return lambda hidden, weight, target: fn(hidden, weight, target, **loss_kwargs)
    return lambda gate, up: fn(gate, up)


def _bitsandbytes_call(case: Case, dtype: torch.dtype) -> Callable:
    try:
        functional = importlib.import_module("bitsandbytes.functional")
    except ImportError as exc:
        raise ImplUnavailable(
            f"bitsandbytes is not importable ({exc}); it is a peer: pip install bitsandbytes "
            "(optkit's quant extra) to compare against it"
        ) from None
    return _nf4_call(functional.dequantize_4bit, case, dtype)


class CompileCache:
    """torch.compile of the eager code, one compiled graph per compile group (token dim dynamic).

    ``disabled_reason`` turns the impl into skipped rows; ``backend`` is torch.compile's (tests pass
    a counting backend to check that a token sweep compiles once).
    """

    def __init__(self, disabled_reason: Optional[str] = None, backend: Any = "inductor"):
        self.disabled_reason = disabled_reason
        self.backend = backend
        self._group: Optional[Tuple[str, str]] = None
        self._compiled: Optional[Callable] = None

    def call_for(self, spec: OpSpec, case: Case, dtype: torch.dtype) -> Callable:
        if self.disabled_reason:
            raise ImplUnavailable(self.disabled_reason)
        if case.compile_group != self._group:
            torch._dynamo.reset()  # a new feature size must compile static, not turn dynamic
            self._compiled = torch.compile(_eager_call(spec, case, dtype), backend=self.backend)
            self._group = case.compile_group
        compiled = self._compiled

        def call(**tensors):
            for name, dims in spec.token_dims.items():
                for dim in dims:
                    torch._dynamo.maybe_mark_dynamic(tensors[name], dim)
            return compiled(**tensors)

        return call


def resolve_impl(
    impl: str, spec: OpSpec, case: Case, device: torch.device, compile_cache: CompileCache, dtype: torch.dtype
) -> Callable:
    """The call of ``impl`` for ``case`` on ``device``. ``dtype`` is the benchmark dtype: the other ops read
    it off their inputs; nf4_dequantize's inputs are packed codes, so its QuantState is told."""
    if impl not in ALL_IMPLS:
        raise ValueError(f"impl {impl!r} unknown; choose one of: {', '.join(ALL_IMPLS)}")
    if impl in spec.not_applicable:
        raise ImplUnavailable(spec.not_applicable[impl])
    if impl not in impls_for(spec.name, (impl,)):
        owner = next(op for op, impls in OP_IMPLS.items() if impl in impls)
        raise ImplUnavailable(f"{impl} is an impl of {owner} only, not of {spec.name}")
    if impl == "optkit":
        return _optkit_call(spec, case, dtype)
    if impl == "eager":
        return _eager_call(spec, case, dtype)
    if impl == "compile":
        return compile_cache.call_for(spec, case, dtype)
    if impl == "liger":
        return _liger_call(spec, case, device)
    if impl == BITSANDBYTES:
        return _bitsandbytes_call(case, dtype)
    if impl == ROPE_INPLACE:
        return _optkit_call(spec, case, dtype, inplace=True)
    return _optkit_call(spec, case, dtype, chunk_rows=CHUNK_IMPLS[impl])


def impl_version(impl: str, env: Dict[str, Any]) -> Optional[str]:
    if impl.startswith("optkit"):
        return env.get("git_sha")
    return {
        "eager": env.get("torch_version"),
        "compile": env.get("torch_version"),
        "liger": env.get("liger_kernel_version"),
        BITSANDBYTES: env.get("bitsandbytes_version"),
    }.get(impl)
