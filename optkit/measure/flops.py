"""FLOPs per trained token of a decoder-only HF model, for MFU (model FLOPs) and HFU (hardware).

Notation, all read from the HF config: L layers, d = hidden_size, Hq / Hkv query / key-value heads,
Dh = head_dim (absent or None -> d / Hq), I = intermediate_size, V = vocab_size, S = seq_len.
Only matmuls are counted (2 FLOPs per multiply-add); norms, rotary, activations, softmax, the loss,
LoRA's scaling and QLoRA's dequantisation are elementwise and left out, as in every MFU convention.

Matmul parameters N (weights a token is multiplied by; the embedding lookup is a gather, not a
matmul, and ``tie_word_embeddings`` changes storage only -- the LM head matmul happens either way):
    per layer attention   d*Dh*(2*Hq + 2*Hkv)           q, k, v, o projections
    per dense layer MLP   3*d*I                          gate, up, down (every supported family is gated)
    per MoE layer         d*E  +  k*3*d*I_moe  [+ 3*d*I_shared + d]
                          router over E experts, only the k ACTIVE experts (num_experts_per_tok),
                          Qwen2-MoE's shared expert and its 1-wide gate when present
    LM head               d*V
A layer is MoE when the config has experts, (layer+1) % decoder_sparse_step == 0 and the layer
is not in mlp_only_layers (Qwen-MoE's rule; Mixtral: every layer). Expert width is
moe_intermediate_size, else intermediate_size (Mixtral). MLA attention (DeepSeek) is refused.

Attention scores A (forward, per token): QK^T and AV each 2*S*Dh per query head:
    A = 4 * L * S * Hq * Dh
over the FULL S x S square: causal masking is NOT halved (torchtitan's 12*L*H*Q*T is 3*A, the
same convention). Sliding windows are ignored too. For packed rows with per-document attention
pass S = sum(len_i^2) / sum(len_i), the token-weighted mean document length.

Per trained token, with P = LoRA parameters acting on the token (A and B matrices):
    full  : model = 6N + 3A       forward 2N + A; backward: input grads 2N + 2A (attention has two
                                  inputs, both need grads), weight grads 2N
    lora  : model = 4N + 6P + 3A  frozen weights: forward 2N + input grads 2N, no weight grads;
                                  each adapter matmul is forward 2P, input grads 2P, weight grads 2P;
                                  attention as in full (gradients must reach q/k/v adapters)
    qlora : same as lora (the base matmul runs in bf16 after dequantisation)
The lora count charges an input gradient to every frozen matmul; autograd can skip it for the
first layer's q/k/v (nothing before them needs a gradient), an overcount below 1/L of attention.

Hardware FLOPs (HFU) add what activation checkpointing recomputes: one more forward of the
decoder layers (not of the LM head): R = 2*N_layers + A (+ 2*P for LoRA adapters inside them).
FlashAttention's own recomputation of QK^T in its backward is not counted (kernel-internal).
A recompute that skips matmuls whose output it would discard (opt.recompute_skips_mlp_down skips
down_proj and its LoRA B) executes R - 2*K, with K the skipped matmul parameters per token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

METHODS = ("full", "lora", "qlora")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def _get(cfg: Any, key: str, default=None):
    value = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
    return default if value is None else value


def _require(cfg: Any, key: str) -> int:
    value = _get(cfg, key)
    if value is None:
        raise ValueError(f"hf_config has no {key!r}; the FLOP count needs it")
    return int(value)


def model_shape(hf_config: Any) -> dict:
    """The sizes the count uses, with HF's defaults filled in."""
    if _get(hf_config, "kv_lora_rank") is not None:
        raise ValueError("MLA attention (kv_lora_rank in the config) is not supported by this FLOP counter")
    d = _require(hf_config, "hidden_size")
    n_heads = _require(hf_config, "num_attention_heads")
    n_experts = int(_get(hf_config, "num_experts", _get(hf_config, "num_local_experts", 0)))
    return {
        "n_layers": _require(hf_config, "num_hidden_layers"),
        "hidden": d,
        "n_heads": n_heads,
        "n_kv_heads": int(_get(hf_config, "num_key_value_heads", n_heads)),
        "head_dim": int(_get(hf_config, "head_dim", d // n_heads)),
        "intermediate": _require(hf_config, "intermediate_size"),
        "vocab": _require(hf_config, "vocab_size"),
        "n_experts": n_experts,
        "experts_per_token": _require(hf_config, "num_experts_per_tok") if n_experts else 0,
        "expert_intermediate": int(_get(hf_config, "moe_intermediate_size", _require(hf_config, "intermediate_size"))),
        "shared_expert_intermediate": int(_get(hf_config, "shared_expert_intermediate_size", 0)),
        "decoder_sparse_step": int(_get(hf_config, "decoder_sparse_step", 1)),
        "mlp_only_layers": tuple(_get(hf_config, "mlp_only_layers", ())),
    }


def is_moe_layer(shape: dict, layer: int) -> bool:
    return (
        shape["n_experts"] > 0
        and (layer + 1) % shape["decoder_sparse_step"] == 0
        and layer not in shape["mlp_only_layers"]
    )


def matmul_params(hf_config: Any) -> dict:
    """N split into attention, MLP (active experts only) and LM head; ``total`` = N."""
    s = model_shape(hf_config)
    d, dh = s["hidden"], s["head_dim"]
    attention = s["n_layers"] * d * dh * (2 * s["n_heads"] + 2 * s["n_kv_heads"])
    mlp = 0
    for layer in range(s["n_layers"]):
        if not is_moe_layer(s, layer):
            mlp += 3 * d * s["intermediate"]
            continue
        mlp += d * s["n_experts"] + s["experts_per_token"] * 3 * d * s["expert_intermediate"]
        if s["shared_expert_intermediate"]:
            mlp += 3 * d * s["shared_expert_intermediate"] + d
    lm_head = d * s["vocab"]
    return {
        "attention": attention,
        "mlp": mlp,
        "layers": attention + mlp,
        "lm_head": lm_head,
        "total": attention + mlp + lm_head,
    }


def lora_params_per_token(hf_config: Any, r: int, targets=ATTENTION_TARGETS + MLP_TARGETS) -> int:
    """LoRA parameters (A: r x in, B: out x r) that act on one token, from the config.

    MoE layers: MLP targets count once per ACTIVE expert (adapters assumed on every expert's
    projections) plus the shared expert; the router is never a target. "lm_head" may be a target.
    """
    s = model_shape(hf_config)
    d, dh = s["hidden"], s["head_dim"]
    q_out, kv_out = s["n_heads"] * dh, s["n_kv_heads"] * dh
    attn_dims = {"q_proj": (d, q_out), "k_proj": (d, kv_out), "v_proj": (d, kv_out), "o_proj": (q_out, d)}
    unknown = set(targets) - set(attn_dims) - set(MLP_TARGETS) - {"lm_head"}
    if unknown:
        raise ValueError(
            f"LoRA targets {sorted(unknown)} unknown; choose from {list(ATTENTION_TARGETS + MLP_TARGETS) + ['lm_head']}"
        )

    def mlp_adapter(width: int) -> int:
        dims = {"gate_proj": (d, width), "up_proj": (d, width), "down_proj": (width, d)}
        return sum(r * sum(dims[t]) for t in targets if t in dims)

    total = 0
    for layer in range(s["n_layers"]):
        total += sum(r * sum(attn_dims[t]) for t in targets if t in attn_dims)
        if not is_moe_layer(s, layer):
            total += mlp_adapter(s["intermediate"])
            continue
        total += s["experts_per_token"] * mlp_adapter(s["expert_intermediate"])
        if s["shared_expert_intermediate"]:
            total += mlp_adapter(s["shared_expert_intermediate"])
    if "lm_head" in targets:
        total += r * (d + s["vocab"])
    return total


def training_flops(
    hf_config: Any,
    seq_len: float,
    method: str,
    checkpointing: bool,
    lora_params: int = 0,
    recompute_skipped_params: int = 0,
) -> dict:
    """Model and hardware FLOPs per trained token, with the formula that produced them.

    ``lora_params``: LoRA parameters acting on each token (``lora_params_per_token``); ignored
    for ``method="full"``. All adapters are assumed to sit inside the decoder layers unless they
    target lm_head, which checkpointing does not recompute -- a negligible difference.
    ``recompute_skipped_params``: matmul parameters per token the recompute leaves out (K above).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} unknown; choose one of: {', '.join(METHODS)}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    s = model_shape(hf_config)
    params = matmul_params(hf_config)
    n, n_layers = params["total"], params["layers"]
    attn = 4 * s["n_layers"] * seq_len * s["n_heads"] * s["head_dim"]
    p = 0 if method == "full" else int(lora_params)
    if method == "full":
        model = 6 * n + 3 * attn
        model_formula = "model = 6N + 3A"
        recompute = 2 * n_layers + attn
        recompute_formula = "R = 2*N_layers + A"
    else:
        model = 4 * n + 6 * p + 3 * attn
        model_formula = f"model = 4N + 6P + 3A ({method}: frozen weights get no weight gradient)"
        recompute = 2 * n_layers + 2 * p + attn
        recompute_formula = "R = 2*N_layers + 2P + A"
    skipped = int(recompute_skipped_params) if checkpointing else 0
    if skipped:
        recompute -= 2 * skipped
        recompute_formula += f" - 2K (K={skipped} matmul params the recompute skips)"
    hardware = model + (recompute if checkpointing else 0)
    formula = (
        f"{model_formula}; hardware = model{' + R, ' + recompute_formula if checkpointing else ''}; "
        f"N={n} matmul params (N_layers={n_layers}, LM head {params['lm_head']}, active experts only), "
        f"P={p} LoRA params, A=4*L*S*Hq*Dh={attn:g} (L={s['n_layers']}, S={seq_len:g}, "
        f"Hq={s['n_heads']}, Dh={s['head_dim']}; full SxS, causal mask not halved)"
    )
    return {
        "model_flops_per_token": float(model),
        "hardware_flops_per_token": float(hardware),
        "formula": formula,
        "matmul_params": n,
        "matmul_params_layers": n_layers,
        "lora_params": p,
        "attention_flops_fwd_per_token": float(attn),
        "method": method,
        "checkpointing": bool(checkpointing),
        "seq_len": seq_len,
    }


def mfu(tokens_per_s: Optional[float], flops_per_token: float, peak_tflops: Optional[float]) -> Optional[float]:
    """Achieved / peak FLOP/s as a fraction (0.42 = 42%); None when the peak is unknown."""
    if peak_tflops is None or peak_tflops <= 0 or tokens_per_s is None:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)
