"""A patched model computes what the unpatched one does: loss, logits and every trainable gradient.

The bar is tests/kernels/_tolerances.py's, applied to a whole model, tensor by tensor: the same model run
unpatched in float64 is the reference; each gradient's relative norm error is bounded per dtype, and its
max error may be at most ERROR_RATIO x the error of the unpatched model in the same dtype, plus one ulp of
slack at that gradient's own scale. Each optimization is checked alone (where it applies to the family) and all of
optkit's kernels together, on every family's tiny config, in float32, one bf16 case, and with peft
LoRA applied first. Real widths in bf16 (Llama-3-8B cut to 2 layers) are the gpu-marked tests.
"""

import copy
import functools

import pytest
import torch

from optkit.config.compose import compose
from optkit.models import build_model
from optkit.opt.patcher import REGISTRY, patch, patch_log, unpatch
from tests.kernels._tolerances import assert_close_to_reference

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2")
KERNELS = ("rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "fused_linear_cross_entropy")
ALL_KERNELS = {"kernels": dict.fromkeys(KERNELS, True)}
# 16 tokens: the Triton interpreter runs rope and cross-entropy one program per token at ~20-50 ms
# each, so tokens, not model size, set this file's runtime (seq 32 took it past four minutes here).
BATCH, SEQ = 2, 8
# Triton kernels run on CUDA tensors, or on CPU ones only under the interpreter (tests/conftest.py
# sets it when there is no GPU): on the GPU machine the tiny cases run on the GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=None)
def _model_cfg(name: str, dtype: str):
    return compose([f"model={name}", f"model.dtype={dtype}"]).model


def _build(name: str, dtype: str = "float32", device=DEVICE, seed: int = 0):
    return build_model(_model_cfg(name, dtype), device=device, seed=seed).train()


def _batch(vocab_size: int, seed: int, device=DEVICE):
    """Token ids and labels with ignored positions (-100), so the mean over real tokens is exercised."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (BATCH, SEQ), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    labels[torch.rand(BATCH, SEQ, generator=gen) < 0.1] = -100
    return ids.to(device), labels.to(device)


def _loss_logits_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    logits = None if out.logits is None else out.logits.detach()
    return out.loss.detach(), logits, grads


def _float64_copy(model):
    ref64 = copy.deepcopy(model).double()
    hf = ref64.get_base_model() if hasattr(ref64, "get_base_model") else ref64
    if getattr(hf.config, "num_experts", 0):  # HF's grouped_mm experts take no float64: use its loop
        setter = getattr(hf, "set_experts_implementation", None)
        if setter is not None:
            setter("eager")
        else:  # an older transformers: the config switch
            hf.config._experts_implementation = "eager"
    return ref64


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_patched_matches(model, opt_cfg, seed: int = 0, **forward_kwargs):
    """Patch ``model`` and compare it to its unpatched self (same dtype) and a float64 copy; returns the
    patched model's, the float64 copy's and the same-dtype copy's gradients by parameter name."""
    dtype = next(model.parameters()).dtype
    same_dtype = copy.deepcopy(model)
    ref64 = _float64_copy(model)
    patch(model, opt_cfg)
    ids, labels = _batch(model.config.vocab_size, seed, next(model.parameters()).device)

    ref_loss, ref_logits, ref_grads = _loss_logits_grads(ref64, ids, labels, **forward_kwargs)
    torch_loss, torch_logits, torch_grads = _loss_logits_grads(same_dtype, ids, labels, **forward_kwargs)
    loss, logits, grads = _loss_logits_grads(model, ids, labels, **forward_kwargs)
    assert_close_to_reference(loss, ref_loss, torch_loss, dtype, name="loss")
    assert grads.keys() == ref_grads.keys(), "patching changed the parameter names"
    for name, grad in grads.items():
        assert grad is not None, f"{name}: no gradient after patching"
        assert_close_to_reference(grad, ref_grads[name], torch_grads[name], dtype, name=f"grad {name}")
    if logits is None:  # the fused loss returned none: ask for them (HF's own head on our hidden states)
        logits, ref_logits, torch_logits = _logits(model, ids), _logits(ref64, ids), _logits(same_dtype, ids)
    assert_close_to_reference(logits, ref_logits, torch_logits, dtype, name="logits")
    return grads, ref_grads, torch_grads


def _applicable(family: str):
    return [k for k in KERNELS if REGISTRY[k].families is None or family in REGISTRY[k].families]


CASES = [(family, kernel) for family in FAMILIES for kernel in _applicable(family)]


@pytest.mark.parametrize("family,kernel", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_each_kernel_alone_float32(family, kernel):
    model = _build(f"tiny_{family}")
    assert_patched_matches(model, {"kernels": {kernel: True}})
    assert not any("skipped" in line for line in patch_log(model)), patch_log(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_kernels_float32(family):
    model = _build(f"tiny_{family}")
    ids, labels = _batch(model.config.vocab_size, seed=1)
    n_real = int((labels[:, 1:] != -100).sum())
    # num_items_in_batch (what HF's Trainer passes under gradient accumulation) turns the mean into
    # sum / num_items; an odd count makes the two differ.
    assert_patched_matches(model, ALL_KERNELS, seed=1, num_items_in_batch=torch.tensor(n_real + 7))


def test_all_kernels_bfloat16():
    """Every parameter's gradient is held to the bf16 bar, q_proj's and k_proj's (reached through RoPE's
    backward) included, and the bar is sharp for each: the patched gradient zeroed, halved or sign-flipped
    fails it (a floor of 1 on the slack once let 6 of these 21 gradients pass as zeros)."""
    model = _build("tiny_llama", dtype="bfloat16")
    grads, ref_grads, torch_grads = assert_patched_matches(model, ALL_KERNELS, seed=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert (
        sorted(grads) == sorted(trainable) and any("q_proj" in n for n in grads) and any("k_proj" in n for n in grads)
    )
    for name, grad in grads.items():
        for wrong in (torch.zeros_like(grad), grad * 0.5, -grad):
            with pytest.raises(AssertionError):
                assert_close_to_reference(wrong, ref_grads[name], torch_grads[name], torch.bfloat16, name=name)


def _with_lora(model):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # init_lora_weights=False: random A and B, so the adapters change the outputs and get real gradients
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_all_kernels_with_lora(family):
    model = _with_lora(_build(f"tiny_{family}"))
    assert_patched_matches(model, ALL_KERNELS, seed=3)
    mlp = model.get_base_model().model.layers[0].mlp
    assert type(mlp).__name__ in ("SwiGLUMLP", "GeGLUMLP")
    assert hasattr(mlp.gate_proj, "lora_A"), "the MLP swap must keep peft's LoRA-wrapped projections"


def test_liger_peer_patches_and_unpatches_on_cpu():
    """The liger peer's wiring (optkit.opt.peers.apply_liger) without running liger's kernels, which do not run
    under the Triton interpreter (liger-kernel 0.8.5's RMSNorm forward: InterpreterError "'float' object has
    no attribute 'to'"): its numbers are test_liger_peer_runs_and_roughly_matches_gpu's."""
    pytest.importorskip(
        "liger_kernel", reason="liger-kernel is not installed (pip install liger-kernel): the liger peer needs it"
    )
    from transformers.models.llama import modeling_llama

    model = _build("tiny_llama")
    hf_rotary, keys = modeling_llama.apply_rotary_pos_emb, list(model.state_dict())

    def instance_forwards():
        return sorted(name for name, module in model.named_modules() if "forward" in module.__dict__)

    assert instance_forwards() == []
    patch(model, "liger")
    log = patch_log(model)
    layers = model.config.num_hidden_layers
    # per layer: two norms, the MLP and the attention (liger's rotary); the final norm; the causal LM's loss
    assert len(instance_forwards()) == 4 * layers + 2, instance_forwards()
    assert f"liger: liger-kernel patched {3 * layers + 2} modules of this LlamaForCausalLM" in log, log
    assert modeling_llama.apply_rotary_pos_emb is hf_rotary, "HF's module globals must stay HF's"
    assert list(model.state_dict()) == keys
    unpatch(model)
    assert instance_forwards() == [] and patch_log(model) == []


# ---- real widths, on the GPU ------------------------------------------------------------------------


def _gpu_llama8b_2_layers():
    cfg = compose(["model=llama3_8b", "model.num_layers=2", "model.dtype=bfloat16"]).model
    return build_model(cfg, device="cuda", seed=0).train()


@pytest.mark.gpu
@pytest.mark.parametrize("opt", ["kernels", "full"])
def test_llama3_8b_two_layers_bf16_gpu(opt):
    """Llama-3-8B's widths (hidden 4096, vocab 128256) cut to 2 layers, bf16: loss and every gradient."""
    assert_patched_matches(_gpu_llama8b_2_layers(), opt, seed=4)


@pytest.mark.gpu
def test_llama3_8b_two_layers_bf16_lora_gpu():
    assert_patched_matches(_with_lora(_gpu_llama8b_2_layers()), "full", seed=5)


@pytest.mark.gpu
def test_llama3_8b_two_layers_bf16_full_compile_gpu():
    """optkit's kernels inside torch.compile (rope's rebound globals must be what Dynamo traces)."""
    assert_patched_matches(_gpu_llama8b_2_layers(), "full_compile", seed=7)


@pytest.mark.gpu
def test_liger_peer_runs_and_roughly_matches_gpu():
    """A wiring check of the peer, not a verdict on its numerics: loss within 2%, gradients within 5%."""
    pytest.importorskip("liger_kernel")
    model = _gpu_llama8b_2_layers()
    reference = copy.deepcopy(model)
    patch(model, "liger")
    ids, labels = _batch(model.config.vocab_size, seed=8, device="cuda")
    loss, _, grads = _loss_logits_grads(model, ids, labels)
    ref_loss, _, ref_grads = _loss_logits_grads(reference, ids, labels)
    assert abs(loss.item() - ref_loss.item()) <= 0.02 * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    for name, grad in grads.items():
        ref = ref_grads[name].float()
        relative = (grad.float() - ref).norm() / ref.norm().clamp_min(1e-12)
        assert relative < 0.05, f"grad {name}: relative error {relative:.3f}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gemma2_9b", "qwen3_8b"])
def test_other_families_two_layers_bf16_gpu(name):
    cfg = compose([f"model={name}", "model.num_layers=2", "model.dtype=bfloat16"]).model
    assert_patched_matches(build_model(cfg, device="cuda", seed=0).train(), "kernels", seed=6)
