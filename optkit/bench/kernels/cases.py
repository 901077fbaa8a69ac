"""The kernels suite's cases: which op at which shape (from conf/model/<name>.yaml, the published
config.json values), its inputs, its eager PyTorch baseline and the bytes it must move.

One ``OpSpec`` per op in ``SPECS``: ``make_inputs(case, dtype, device)`` gives named leaf tensors
(those with requires_grad get gradients), ``eager`` is the code as users run it (HF's module math,
F.* on upcast logits), ``bytes_moved`` the byte model below. The implementations that are timed
against it (optkit, torch.compile, Liger) are resolved in optkit/bench/kernels/impls.py.

Bytes the op must move: a lower bound every implementation is held to (N tokens, s bytes per
element of the benchmark dtype; int64 targets; fp32 per-row statistics; "+" terms are small):

| op                         | forward                                   | backward                                            |
|----------------------------|-------------------------------------------|-----------------------------------------------------|
| rms_norm (N, H)            | read x, w; write y (+ rstd N*4)           | read dy, x, w, rstd; write dx, dw                   |
| rope q (B,Hq,S,D), k       | read q, k, cos, sin (S*D); write q', k'   | read dq', dk', cos, sin; write dq, dk               |
| swiglu / geglu (N, I)      | read gate, up; write out (3*N*I*s)        | read dout, gate, up; write dgate, dup (5*N*I*s)     |
| cross_entropy (N, V)       | read logits (+ target); write lse (N*4)   | read logits, lse, target; write dlogits             |
| fused_linear_cross_entropy | read h (N,H), W (V,H) (+ target)          | read h, W again; write dh, dW                       |

"full" is forward + backward. The counts are logical traffic: a fused cross entropy that re-reads a
row's logits from L2 in its gradient pass moves less through HBM and can show > 100% of copy. The
FLCE op is compute-bound (6*N*H*V matmul FLOPs per forward+backward): its rows also carry
``tflops_full``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

OPS = ("rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "fused_linear_cross_entropy")
FLCE = "fused_linear_cross_entropy"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# The sweep: shapes come from conf/model/<name>.yaml (published config.json values).
MODELS = ("llama3_8b", "qwen3_8b", "gemma2_9b")
TOKENS = (1024, 4096, 16384)
CE_TOKENS = (4096, 8192)
FLCE_POINTS = (("llama3_8b", 8192),)  # 8192 x 4096 -> 128256
ROPE_SEQ_LEN = 4096  # rope batches of tokens // 4096 sequences (one shorter sequence below that)
# Quick mode: one shape per op (the first model providing it) at a typical step's token count.
QUICK_TOKENS = (4096,)
QUICK_CE_TOKENS = (8192,)
IGNORE_INDEX = -100
TOKEN_DIMS = ("T", "B", "S")  # dims of a Case that grow with the token count


@dataclass
class Case:
    """One op at one shape. ``dims`` are named sizes, ``params`` the op's non-tensor arguments."""

    op: str
    model: str
    dims: Dict[str, int]
    params: Dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.dims["T"]

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
        "family": cfg["family"], "hidden": hf["hidden_size"], "intermediate": hf["intermediate_size"],
        "heads_q": heads, "heads_kv": hf.get("num_key_value_heads", heads),
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads, "vocab": hf["vocab_size"],
        "eps": hf.get("rms_norm_eps", 1e-6), "softcap": hf.get("final_logit_softcapping"),
        "activation": hf.get("hidden_activation") or hf.get("hidden_act") or "silu",
    }


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
        return [Case(op, model, {"T": t, "H": m["hidden"], "V": m["vocab"]}, {"softcap": m["softcap"]})
                for t in tokens]
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
        else:
            tokens = (QUICK_CE_TOKENS if quick else CE_TOKENS) if op == "cross_entropy" else (
                QUICK_TOKENS if quick else TOKENS)
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
    tiny = {"family": "llama", "hidden": 64, "intermediate": 96, "heads_q": 4, "heads_kv": 2, "head_dim": 16,
            "vocab": 257, "eps": 1e-6, "softcap": None, "activation": "silu"}
    out: List[Case] = []
    for op in ops:
        m = dict(tiny, activation="gelu_pytorch_tanh") if op == "geglu" else tiny
        out.extend(_cases_for_model(op, "tiny", m, (16,)))
    return out


# --------------------------------------------------------------------------- ops
# make_inputs(case, dtype, device) -> named leaf tensors; those with requires_grad get gradients.


def _randn(shape, dtype, device, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


def _rms_norm_inputs(case: Case, dtype, device) -> Dict[str, torch.Tensor]:
    n, h = case.tokens, case.dims["H"]
    weight_center = 0.0 if case.params["offset"] else 1.0  # Gemma stores weight - 1
    return {"x": _randn((n, h), dtype, device),
            "weight": (_randn((h,), dtype, device, 0.1, grad=False) + weight_center).requires_grad_()}


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
    return {"hidden": _randn((case.tokens, h), dtype, device), "weight": _randn((v, h), dtype, device, h ** -0.5),
            "target": _targets(case, device)}


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


# Bytes the op must move (see the table in the module docstring): (forward, backward).


def _rms_norm_bytes(case: Case, s: int) -> Tuple[int, int]:
    n, h = case.tokens, case.dims["H"]
    fwd = 2 * n * h * s + h * s + 4 * n
    bwd = 3 * n * h * s + 2 * h * s + 4 * n
    return fwd, bwd


def _rope_bytes(case: Case, s: int) -> Tuple[int, int]:
    d = case.dims
    qk = d["B"] * d["S"] * (d["Hq"] + d["Hkv"]) * d["D"] * s
    cos_sin = 2 * d["S"] * d["D"] * s
    return 2 * qk + cos_sin, 2 * qk + cos_sin


def _gated_bytes(case: Case, s: int) -> Tuple[int, int]:
    n_i = case.tokens * case.dims["I"]
    return 3 * n_i * s, 5 * n_i * s


def _ce_bytes(case: Case, s: int) -> Tuple[int, int]:
    n, v = case.tokens, case.dims["V"]
    return n * v * s + 8 * n + 4 * n, 2 * n * v * s + 8 * n + 4 * n


def _flce_bytes(case: Case, s: int) -> Tuple[int, int]:
    n, h, v = case.tokens, case.dims["H"], case.dims["V"]
    operands = (n * h + v * h) * s
    return operands + 8 * n, 2 * operands


@dataclass(frozen=True)
class OpSpec:
    name: str
    make_inputs: Callable[[Case, torch.dtype, torch.device], Dict[str, torch.Tensor]]
    eager: Callable[..., Any]
    optkit_fn: str  # function name in optkit/kernels/<name>.py
    liger_fn: str  # function name in liger_kernel.transformers.functional
    bytes_moved: Callable[[Case, int], Tuple[int, int]]
    token_dims: Dict[str, Tuple[int, ...]]  # input -> dims that grow with tokens (dynamic under compile)
    fused_loss: bool = False  # optkit and Liger compute the gradient in forward

    def flops_full(self, case: Case) -> Optional[int]:
        if self.name != "fused_linear_cross_entropy":
            return None
        return 6 * case.tokens * case.dims["H"] * case.dims["V"]


SPECS: Dict[str, OpSpec] = {s.name: s for s in (
    OpSpec("rms_norm", _rms_norm_inputs, _eager_rms_norm, "rms_norm", "liger_rms_norm", _rms_norm_bytes,
           {"x": (0,)}),
    OpSpec("rope", _rope_inputs, _eager_rope, "apply_rotary", "liger_rope", _rope_bytes,
           {"q": (0, 2), "k": (0, 2), "cos": (0,), "sin": (0,)}),
    OpSpec("swiglu", _gated_inputs, _eager_swiglu, "swiglu", "liger_swiglu", _gated_bytes,
           {"gate": (0,), "up": (0,)}),
    OpSpec("geglu", _gated_inputs, _eager_geglu, "geglu", "liger_geglu", _gated_bytes,
           {"gate": (0,), "up": (0,)}),
    OpSpec("cross_entropy", _ce_inputs, _eager_cross_entropy, "cross_entropy", "liger_cross_entropy", _ce_bytes,
           {"logits": (0,), "target": (0,)}, fused_loss=True),
    OpSpec("fused_linear_cross_entropy", _flce_inputs, _eager_flce, "fused_linear_cross_entropy",
           "liger_fused_linear_cross_entropy", _flce_bytes, {"hidden": (0,), "target": (0,)}, fused_loss=True),
)}
assert tuple(SPECS) == OPS
