"""FLOP counts against hand counts written out term by term, and against real HF/PEFT modules."""

import pytest

from optkit.measure.flops import lora_params_per_token, matmul_params, mfu, training_flops

# 2-layer llama-like: d=64, Hq=4, Hkv=2, Dh=16, I=128, V=100
LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    tie_word_embeddings=False,
)
S = 32
# Hand count, one line per term:
Q, K, V_, O_ = 64 * 64, 64 * 32, 64 * 32, 64 * 64  # q: d->Hq*Dh, k/v: d->Hkv*Dh, o: Hq*Dh->d
ATTN_PER_LAYER = Q + K + V_ + O_  # 12288
MLP_PER_LAYER = 3 * 64 * 128  # gate, up, down: 24576
LM_HEAD = 64 * 100  # 6400
N_LAYERS = 2 * (ATTN_PER_LAYER + MLP_PER_LAYER)  # 73728
N = N_LAYERS + LM_HEAD  # 80128
A = 4 * 2 * S * 4 * 16  # 4*L*S*Hq*Dh = 16384

# Tiny Qwen3-MoE-like: layer 0 MoE (8 experts, top-2, width 16), layer 1 dense (mlp_only_layers)
MOE = dict(
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=8,
    vocab_size=50,
    num_experts=8,
    num_experts_per_tok=2,
    decoder_sparse_step=1,
    mlp_only_layers=[1],
)
MOE_ATTN = 2 * (32 * 32 * 4)  # q,k,v,o each 32x32, two layers: 8192
MOE_LAYER0 = 32 * 8 + 2 * 3 * 32 * 16  # router d*E + 2 active experts x 3 matrices: 3328
DENSE_LAYER1 = 3 * 32 * 64  # 6144
MOE_N = MOE_ATTN + MOE_LAYER0 + DENSE_LAYER1 + 32 * 50  # + LM head: 19264


def test_dense_matmul_params_and_full_flops_match_hand_count():
    params = matmul_params(LLAMA)
    assert params["total"] == N == 80128
    assert params["layers"] == N_LAYERS
    out = training_flops(LLAMA, seq_len=S, method="full", checkpointing=False)
    assert out["model_flops_per_token"] == 6 * N + 3 * A == 529920
    assert out["hardware_flops_per_token"] == out["model_flops_per_token"]
    assert "causal mask not halved" in out["formula"]


def test_head_dim_absent_or_none_falls_back_to_hidden_over_heads():
    assert matmul_params({**LLAMA, "head_dim": None})["total"] == N
    assert matmul_params({**LLAMA, "head_dim": 32})["total"] != N  # explicit head_dim is used


def test_moe_counts_only_active_experts_and_router():
    assert matmul_params(MOE)["total"] == MOE_N == 19264
    all_moe = {**MOE, "mlp_only_layers": []}
    assert matmul_params(all_moe)["total"] == MOE_ATTN + 2 * MOE_LAYER0 + 32 * 50
    a = 4 * 2 * 16 * 4 * 8
    out = training_flops(MOE, seq_len=16, method="full", checkpointing=False)
    assert out["model_flops_per_token"] == 6 * MOE_N + 3 * a


def test_mixtral_style_keys():
    mixtral = {**MOE, "num_local_experts": 8}
    del mixtral["num_experts"], mixtral["moe_intermediate_size"], mixtral["mlp_only_layers"]
    # experts use intermediate_size (64) when moe_intermediate_size is absent; every layer is MoE
    per_layer = 32 * 8 + 2 * 3 * 32 * 64
    assert matmul_params(mixtral)["total"] == MOE_ATTN + 2 * per_layer + 32 * 50


def test_lora_flops_and_ratio_to_full():
    r = 4
    # per layer: q (64+64), k (64+32), v (64+32), o (64+64), gate (64+128), up (64+128), down (128+64)
    p_hand = 2 * r * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    p = lora_params_per_token(LLAMA, r=r)
    assert p == p_hand == 8192
    lora = training_flops(LLAMA, seq_len=S, method="lora", checkpointing=False, lora_params=p)
    full = training_flops(LLAMA, seq_len=S, method="full", checkpointing=False)
    assert lora["model_flops_per_token"] == 4 * N + 6 * p + 3 * A
    ratio = lora["model_flops_per_token"] / full["model_flops_per_token"]
    assert ratio == pytest.approx((4 * N + 6 * p + 3 * A) / (6 * N + 3 * A))
    qlora = training_flops(LLAMA, seq_len=S, method="qlora", checkpointing=False, lora_params=p)
    assert qlora["model_flops_per_token"] == lora["model_flops_per_token"]


def test_checkpointing_adds_one_forward_of_the_layers_to_hardware_flops_only():
    full = training_flops(LLAMA, seq_len=S, method="full", checkpointing=True)
    assert full["model_flops_per_token"] == 6 * N + 3 * A
    assert full["hardware_flops_per_token"] - full["model_flops_per_token"] == 2 * N_LAYERS + A
    lora = training_flops(LLAMA, seq_len=S, method="lora", checkpointing=True, lora_params=100)
    assert lora["hardware_flops_per_token"] - lora["model_flops_per_token"] == 2 * N_LAYERS + 2 * 100 + A


def test_bad_inputs_say_what_to_do():
    with pytest.raises(ValueError, match="choose one of"):
        training_flops(LLAMA, seq_len=S, method="dora", checkpointing=False)
    with pytest.raises(ValueError, match="vocab_size"):
        matmul_params({k: v for k, v in LLAMA.items() if k != "vocab_size"})
    with pytest.raises(ValueError, match="MLA"):
        matmul_params({**LLAMA, "kv_lora_rank": 512})
    with pytest.raises(ValueError, match="unknown"):
        lora_params_per_token(LLAMA, r=4, targets=("qkv",))


def test_mfu_and_unknown_peak():
    assert mfu(1000.0, 1e12, 1000.0) == pytest.approx(1.0)
    assert mfu(500.0, 6e12, 989.4) == pytest.approx(3e15 / 989.4e12)
    assert mfu(1000.0, 1e12, None) is None


def test_counts_agree_with_a_real_hf_llama_and_peft_lora():
    """Independent reference: the Linear weights of an HF model, and PEFT's trainable params."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import torch

    cfg = transformers.LlamaConfig(**LLAMA)
    assert matmul_params(cfg)["total"] == N  # a PretrainedConfig works like a dict
    model = transformers.LlamaForCausalLM(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(cfg)["total"] == linear
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets))
    trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    assert lora_params_per_token(cfg, r=4, targets=targets) == trainable


def test_moe_count_agrees_with_a_real_hf_qwen3_moe():
    """Reference: 2-D matmul weights (router included, embedding excluded) + expert tensors x k/E."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(**MOE)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    named = list(model.named_parameters())
    dense = sum(p.numel() for n, p in named if p.ndim == 2 and "embed_tokens" not in n)
    experts = sum(p.numel() for n, p in named if p.ndim == 3)  # (E, out, in) fused expert weights
    assert experts > 0, "expected fused 3-D expert weights; the reference needs updating"
    assert matmul_params(cfg)["total"] == dense + experts * MOE["num_experts_per_tok"] // MOE["num_experts"]


def test_a_recompute_that_skips_matmuls_counts_them_out_of_hardware_flops_only():
    skipped = 2 * 64 * 128  # the down projection of both layers
    plain = training_flops(LLAMA, seq_len=S, method="lora", checkpointing=True, lora_params=0)
    out = training_flops(LLAMA, seq_len=S, method="lora", checkpointing=True, recompute_skipped_params=skipped)
    assert out["model_flops_per_token"] == plain["model_flops_per_token"]
    assert plain["hardware_flops_per_token"] - out["hardware_flops_per_token"] == 2 * skipped
    assert f"K={skipped}" in out["formula"]
    no_recompute = training_flops(
        LLAMA, seq_len=S, method="lora", checkpointing=False, recompute_skipped_params=skipped
    )
    assert no_recompute["hardware_flops_per_token"] == no_recompute["model_flops_per_token"]
