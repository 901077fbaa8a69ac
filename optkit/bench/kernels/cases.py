"""The kernels suite's cases: which op at which shape (from conf/model/<name>.yaml, the published
config.json values). Each op's inputs, eager baseline and byte model are ops.py's; the implementations
timed against it (optkit, torch.compile, Liger, bitsandbytes) are resolved in impls.py.

A forward-only op (``OpSpec.forward_only``: nf4_dequantize, whose quantized weight is frozen) has no
backward to time: its "full" phase is the forward and its rows' backward fields are None
(optkit/bench/kernels/phases.py). The FLCE op is compute-bound (6*N*H*V matmul FLOPs per
forward+backward): its rows also carry ``tflops_full``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

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
