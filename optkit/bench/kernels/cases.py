"""The kernels suite's cases: which op at which shape (from conf/model/<name>.yaml, the published
config.json values), its inputs and its eager PyTorch baseline.

One ``OpSpec`` per op in ``SPECS``: ``make_inputs(case, dtype, device)`` gives named leaf tensors
(those with requires_grad get gradients), ``eager`` is the code as users run it (HF's module math,
F.* on upcast logits; for nf4_dequantize, whose users run bitsandbytes, optkit's PyTorch reference),
``bytes_moved`` the byte model of optkit/bench/kernels/byte_model.py. The implementations that are
timed against it (optkit, torch.compile, Liger, bitsandbytes) are resolved in
optkit/bench/kernels/impls.py.

A forward-only op (``OpSpec.forward_only``: nf4_dequantize, whose quantized weight is frozen) has no
backward to time: its "full" phase is the forward and its rows' backward fields are None
(optkit/bench/kernels/phases.py). The FLCE op is compute-bound (6*N*H*V matmul FLOPs per
forward+backward): its rows also carry ``tflops_full``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from optkit.bench.kernels import byte_model

OPS = ("rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "fused_linear_cross_entropy", "nf4_dequantize")
FLCE = "fused_linear_cross_entropy"
NF4 = "nf4_dequantize"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# The sweep: shapes come from conf/model/<name>.yaml (published config.json values).
MODELS = ("llama3_8b", "qwen3_8b", "gemma2_9b")
TOKENS = (1024, 4096, 16384)
CE_TOKENS = (4096, 8192)
FLCE_POINTS = (("llama3_8b", 8192),)  # 8192 x 4096 -> 128256
ROPE_SEQ_LEN = 4096  # rope batches of tokens // 4096 sequences (one shorter sequence below that)
# NF4 dequantize: Llama-3-8B's linear weights, quantized as optkit's QLoRA (train/qlora.py) quantizes
# them: NF4 in bitsandbytes' Linear4bit blocks of 64, double-quantized absmax, uint8 storage.
NF4_MODELS = ("llama3_8b",)
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256  # bitsandbytes' block of absmax values under double quantization (fixed)
# Quick mode: one shape per op (the first model providing it) at a typical step's token count.
QUICK_TOKENS = (4096,)
QUICK_CE_TOKENS = (8192,)
IGNORE_INDEX = -100
TOKEN_DIMS = ("T", "B", "S")  # dims of a Case that grow with the token count


class InputsUnavailable(Exception):
    """The op's inputs cannot be made here (a package missing): every impl of the case is a skipped row."""


@dataclass
class Case:
    """One op at one shape. ``dims`` are named sizes, ``params`` the op's non-tensor arguments."""

    op: str
    model: str
    dims: Dict[str, int]
    params: Dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> Optional[int]:
        """Rows of the op; None for an op on a weight (nf4_dequantize), which has no token count."""
        return self.dims.get("T")

    @property
    def shape(self) -> str:
        return self._label(self.dims)

    @property
    def compile_group(self) -> Tuple[str, str]:
        """Cases one compiled graph serves: the same op and sizes but for those that grow with tokens."""
        return self.op, self._label({k: v for k, v in self.dims.items() if k not in TOKEN_DIMS})

    def _label(self, dims: Dict[str, int]) -> str:
        mode = self.params.get("cast_mode")
        suffix = f"-{mode}" if mode not in (None, "llama") else ""
        if self.params.get("softcap"):
            suffix += f"-softcap{self.params['softcap']:g}"
        return "x".join(f"{k}{v}" for k, v in dims.items()) + suffix


def model_shape(name: str) -> Dict[str, Any]:
    """The sizes an op benchmark needs, read from conf/model/<name>.yaml."""
    from omegaconf import OmegaConf

    from optkit.config.compose import CONF_DIR

    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"model {name!r} has no {path}; choose one of the files in {path.parent}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    hf = cfg["hf_config"]
    heads = hf["num_attention_heads"]
    return {
        "family": cfg["family"],
        "hidden": hf["hidden_size"],
        "intermediate": hf["intermediate_size"],
        "heads_q": heads,
        "heads_kv": hf.get("num_key_value_heads", heads),
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "vocab": hf["vocab_size"],
        "eps": hf.get("rms_norm_eps", 1e-6),
        "softcap": hf.get("final_logit_softcapping"),
        "activation": hf.get("hidden_activation") or hf.get("hidden_act") or "silu",
    }


def linear_shapes(m: Dict[str, Any]) -> List[Tuple[int, int]]:
    """The (out, in) shapes of a decoder layer's linear weights, each once: q/o, k/v, gate/up, down."""
    q, kv, hidden, inter = m["heads_q"] * m["head_dim"], m["heads_kv"] * m["head_dim"], m["hidden"], m["intermediate"]
    shapes = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inter, hidden), (inter, hidden), (hidden, inter)]
    return list(dict.fromkeys(shapes))


def _cases_for_model(op: str, model: str, m: Dict[str, Any], tokens: Sequence[int]) -> List[Case]:
    gemma = m["family"].startswith("gemma")
    if op == "rms_norm":
        params = {"eps": m["eps"], "offset": 1.0 if gemma else 0.0, "cast_mode": "gemma" if gemma else "llama"}
        return [Case(op, model, {"T": t, "H": m["hidden"]}, params) for t in tokens]
    if op == "rope":
        out = []
        for t in tokens:
            seq = min(t, ROPE_SEQ_LEN)
            if t % seq:
                raise ValueError(f"rope: {t} tokens are not whole sequences of {seq}; use a multiple of {seq}")
            dims = {"T": t, "B": t // seq, "S": seq, "Hq": m["heads_q"], "Hkv": m["heads_kv"], "D": m["head_dim"]}
            out.append(Case(op, model, dims))
        return out
    if op in ("swiglu", "geglu"):
        is_gelu = m["activation"].startswith("gelu")
        if is_gelu != (op == "geglu"):
            return []
        params = {"approximate": "tanh" if "tanh" in m["activation"] else "none"} if is_gelu else {}
        return [Case(op, model, {"T": t, "I": m["intermediate"]}, params) for t in tokens]
    if op == "cross_entropy":
        return [Case(op, model, {"T": t, "V": m["vocab"]}, {"softcap": m["softcap"]}) for t in tokens]
    if op == "fused_linear_cross_entropy":
        return [Case(op, model, {"T": t, "H": m["hidden"], "V": m["vocab"]}, {"softcap": m["softcap"]}) for t in tokens]
    if op == NF4:  # a weight, whatever the token count
        params = {"blocksize": NF4_BLOCKSIZE, "nested_blocksize": NF4_NESTED_BLOCKSIZE}
        return [Case(op, model, {"O": out, "I": inp}, params) for out, inp in linear_shapes(m)]
    raise ValueError(f"op {op!r} unknown; choose one of: {', '.join(OPS)}")


def sweep_cases(quick: bool = False, ops: Sequence[str] = OPS) -> List[Case]:
    """The suite's cases, grouped by compile group; shapes shared by two models appear once."""
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"op(s) {', '.join(unknown)} unknown; choose from: {', '.join(OPS)}")
    cases: List[Case] = []
    for op in ops:
        if op == "fused_linear_cross_entropy":
            per_model = [(model, (t,)) for model, t in FLCE_POINTS]
        elif op == NF4:
            per_model = [(model, ()) for model in NF4_MODELS]
        else:
            tokens = (
                (QUICK_CE_TOKENS if quick else CE_TOKENS)
                if op == "cross_entropy"
                else (QUICK_TOKENS if quick else TOKENS)
            )
            per_model = [(model, tokens) for model in MODELS]
        seen, op_cases = set(), []
        for model, tokens in per_model:
            for case in _cases_for_model(op, model, model_shape(model), tokens):
                if case.shape not in seen:
                    seen.add(case.shape)
                    op_cases.append(case)
        if quick:  # the first model's shape only
            first = op_cases[0].compile_group if op_cases else None
            op_cases = [c for c in op_cases if c.compile_group == first]
        cases.extend(op_cases)
    return cases


def smoke_cases(ops: Sequence[str] = OPS) -> List[Case]:
    """Tiny shapes (a vocab of 257: not a power of 2) for the CPU plumbing check."""
    tiny = {
        "family": "llama",
        "hidden": 64,
        "intermediate": 96,
        "heads_q": 4,
        "heads_kv": 2,
        "head_dim": 16,
        "vocab": 257,
        "eps": 1e-6,
        "softcap": None,
        "activation": "silu",
    }
    # nf4_dequantize: an intermediate of 128, as bitsandbytes 0.50's CPU dequantize_4bit is wrong for some
    # shapes, down_proj's (64, 96) among them; it gets these right (tests/bench/test_kernels_suite.py checks).
    per_op = {"geglu": dict(tiny, activation="gelu_pytorch_tanh"), NF4: dict(tiny, intermediate=128)}
    out: List[Case] = []
    for op in ops:
        out.extend(_cases_for_model(op, "tiny", per_op.get(op, tiny), (16,)))
    return out


# --------------------------------------------------------------------------- ops
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
