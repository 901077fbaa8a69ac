"""The kernels suite's ops: one ``OpSpec`` per op in ``SPECS``. ``make_inputs(case, dtype, device)`` gives
named leaf tensors (those with requires_grad get gradients); ``eager`` is the code as users run it (HF's
module math, F.* on upcast logits; for nf4_dequantize, whose users run bitsandbytes, optkit's PyTorch
reference); ``bytes_moved`` the byte model of byte_model.py. The implementations timed against it are
resolved in impls.py; which op runs at which shape is cases.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from optkit.bench.kernels import byte_model
from optkit.bench.kernels.cases import FLCE, IGNORE_INDEX, NF4, OPS, Case, InputsUnavailable

# make_inputs(case, dtype, device) -> named leaf tensors; those with requires_grad get gradients.


def _randn(shape, dtype, device, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


def _rms_norm_inputs(case: Case, dtype, device) -> Dict[str, torch.Tensor]:
    n, h = case.tokens, case.dims["H"]
    weight_center = 0.0 if case.params["offset"] else 1.0  # Gemma stores weight - 1
    return {
        "x": _randn((n, h), dtype, device),
        "weight": (_randn((h,), dtype, device, 0.1, grad=False) + weight_center).requires_grad_(),
    }


def _rope_inputs(case: Case, dtype, device) -> Dict[str, torch.Tensor]:
    d = case.dims
    # HF's layout: (B, S, H, D) projections viewed as (B, H, S, D), not contiguous.
    q = torch.randn(d["B"], d["S"], d["Hq"], d["D"], device=device).to(dtype).transpose(1, 2)
    k = torch.randn(d["B"], d["S"], d["Hkv"], d["D"], device=device).to(dtype).transpose(1, 2)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d["D"], 2, device=device).float() / d["D"]))
    angles = torch.arange(d["S"], device=device).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)  # (S, D)
    return {"q": q.requires_grad_(), "k": k.requires_grad_(), "cos": emb.cos().to(dtype), "sin": emb.sin().to(dtype)}


def _gated_inputs(case: Case, dtype, device) -> Dict[str, torch.Tensor]:
    shape = (case.tokens, case.dims["I"])
    return {"gate": _randn(shape, dtype, device), "up": _randn(shape, dtype, device)}


def _targets(case: Case, device) -> torch.Tensor:
    return torch.randint(0, case.dims["V"], (case.tokens,), device=device)


def _ce_inputs(case: Case, dtype, device) -> Dict[str, torch.Tensor]:
    return {"logits": _randn((case.tokens, case.dims["V"]), dtype, device, 2.0), "target": _targets(case, device)}


def _flce_inputs(case: Case, dtype, device) -> Dict[str, torch.Tensor]:
    h, v = case.dims["H"], case.dims["V"]
    return {
        "hidden": _randn((case.tokens, h), dtype, device),
        "weight": _randn((v, h), dtype, device, h**-0.5),
        "target": _targets(case, device),
    }


def _nf4_inputs(case: Case, dtype, device) -> Dict[str, torch.Tensor]:
    try:
        from bitsandbytes.functional import quantize_4bit
    except ImportError as exc:
        raise InputsUnavailable(
            f"bitsandbytes is not importable ({exc}); nf4_dequantize's input is its NF4 format: "
            "pip install bitsandbytes (optkit's quant extra) to measure it"
        ) from None
    weight = _randn((case.dims["O"], case.dims["I"]), dtype, device, 0.02, grad=False)  # a Linear's scale
    packed, state = quantize_4bit(
        weight,
        blocksize=case.params["blocksize"],
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=torch.uint8,
    )
    if state.state2.blocksize != case.params["nested_blocksize"]:
        raise ValueError(
            f"this bitsandbytes double-quantizes absmax in blocks of {state.state2.blocksize}, "
            f"not {case.params['nested_blocksize']}: update NF4_NESTED_BLOCKSIZE"
        )
    # The QuantState is no tensor the harness could copy per repeat: its tensors are the inputs, and
    # nf4_quant_state puts them back together around each repeat's copies.
    return {
        "weight_packed": packed,
        "absmax": state.absmax,
        "nested_absmax": state.state2.absmax,
        "nested_code": state.state2.code,
        "offset": state.offset,
        "code": state.code,
    }


def nf4_quant_state(case: Case, dtype: torch.dtype, absmax, nested_absmax, nested_code, offset, code):
    """bitsandbytes' QuantState of the case's double-quantized weight (``dtype``: the weight's, so the output's)."""
    from bitsandbytes.functional import QuantState

    nested = QuantState(
        absmax=nested_absmax, code=nested_code, blocksize=case.params["nested_blocksize"], dtype=torch.float32
    )
    return QuantState(
        absmax=absmax,
        shape=torch.Size((case.dims["O"], case.dims["I"])),
        code=code,
        blocksize=case.params["blocksize"],
        quant_type="nf4",
        dtype=dtype,
        offset=offset,
        state2=nested,
    )


# The eager baselines: the code as users run it (HF's module math, F.* on upcast logits).


def _eager_rms_norm(x, weight, eps, offset, cast_mode):
    if cast_mode == "gemma":  # Gemma2RMSNorm: everything in fp32, one rounding at the end
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (normed * (offset + weight.float())).type_as(x)
    hidden = x.to(torch.float32)  # LlamaRMSNorm (Qwen2/3, Mistral alike)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _eager_rope(q, k, cos, sin):  # HF apply_rotary_pos_emb; cos/sin (S, D) broadcast over (B, H)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _eager_swiglu(gate, up):
    return F.silu(gate) * up


def _eager_geglu(gate, up, approximate="tanh"):
    return F.gelu(gate, approximate=approximate) * up


def _eager_cross_entropy(logits, target, softcap=None):
    if softcap:  # Gemma2ForCausalLM soft-caps in the logits' dtype before the loss
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)  # HF's loss upcasts


def _eager_flce(hidden, weight, target, softcap=None):
    return _eager_cross_entropy(F.linear(hidden, weight), target, softcap)


def _eager_nf4_dequantize(weight_packed, quant_state):
    # Users dequantize with bitsandbytes (an impl of its own): "eager" is optkit's plain-PyTorch reference,
    # imported here because its module also defines the Triton kernel (triton must not load before the
    # CPU smoke sets TRITON_INTERPRET).
    from optkit.kernels.nf4_dequantize import reference_nf4_dequantize

    return reference_nf4_dequantize(weight_packed, quant_state)


@dataclass(frozen=True)
class OpSpec:
    name: str
    make_inputs: Callable[[Case, torch.dtype, torch.device], Dict[str, torch.Tensor]]
    eager: Callable[..., Any]
    optkit_fn: str  # function name in optkit/kernels/<name>.py
    liger_fn: Optional[str]  # function name in liger_kernel.transformers.functional (None: not_applicable says why)
    byte_model: Callable[..., Tuple[int, Optional[int]]]  # (dims, params, s) -> bytes (forward, backward or None)
    token_dims: Dict[str, Tuple[int, ...]]  # input -> dims that grow with tokens (dynamic under compile)
    fused_loss: bool = False  # optkit and Liger compute the gradient in forward
    forward_only: bool = False  # no backward (the op of a frozen weight): "full" is the forward, bwd fields None
    not_applicable: Dict[str, str] = field(default_factory=dict)  # impl -> why it has no measurement (skipped row)

    def bytes_moved(self, case: Case, itemsize: int) -> Tuple[int, Optional[int]]:
        """Bytes the op must move at ``case`` (optkit/bench/kernels/byte_model.py), forward and backward."""
        return self.byte_model(case.dims, case.params, itemsize)

    def flops_full(self, case: Case) -> Optional[int]:
        if self.name != FLCE:
            return None
        return 6 * case.tokens * case.dims["H"] * case.dims["V"]


NF4_NOT_APPLICABLE = {
    "compile": "torch.compile does not apply: users run bitsandbytes (its own row), not the PyTorch reference (eager)",
    "liger": "Liger-Kernel has no NF4 dequantize",
}

SPECS: Dict[str, OpSpec] = {
    s.name: s
    for s in (
        OpSpec(
            "rms_norm",
            _rms_norm_inputs,
            _eager_rms_norm,
            "rms_norm",
            "liger_rms_norm",
            byte_model.rms_norm_bytes,
            {"x": (0,)},
        ),
        OpSpec(
            "rope",
            _rope_inputs,
            _eager_rope,
            "apply_rotary",
            "liger_rope",
            byte_model.rope_bytes,
            {"q": (0, 2), "k": (0, 2), "cos": (0,), "sin": (0,)},
        ),
        OpSpec(
            "swiglu",
            _gated_inputs,
            _eager_swiglu,
            "swiglu",
            "liger_swiglu",
            byte_model.gated_bytes,
            {"gate": (0,), "up": (0,)},
        ),
        OpSpec(
            "geglu",
            _gated_inputs,
            _eager_geglu,
            "geglu",
            "liger_geglu",
            byte_model.gated_bytes,
            {"gate": (0,), "up": (0,)},
        ),
        OpSpec(
            "cross_entropy",
            _ce_inputs,
            _eager_cross_entropy,
            "cross_entropy",
            "liger_cross_entropy",
            byte_model.ce_bytes,
            {"logits": (0,), "target": (0,)},
            fused_loss=True,
        ),
        OpSpec(
            FLCE,
            _flce_inputs,
            _eager_flce,
            FLCE,
            "liger_fused_linear_cross_entropy",
            byte_model.flce_bytes,
            {"hidden": (0,), "target": (0,)},
            fused_loss=True,
        ),
        OpSpec(
            NF4,
            _nf4_inputs,
            _eager_nf4_dequantize,
            "nf4_dequantize",
            None,
            byte_model.nf4_dequantize_bytes,
            {},
            forward_only=True,
            not_applicable=NF4_NOT_APPLICABLE,
        ),
    )
}
assert tuple(SPECS) == OPS
