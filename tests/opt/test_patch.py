"""The patcher's contract: registry completeness, idempotence, exact unpatch, per-instance patching,
clear errors (missing requirement, unsupported family, conflicts), and opt=full on every family.

Numerical equivalence of patched models is tests/opt/test_patch_equivalence.py's job; here the models
run only where a behaviour needs it, at 8 tokens (the Triton interpreter is slow per token).
"""

import copy
import dataclasses
import importlib
import importlib.util
import inspect

import pytest
import torch
from omegaconf import OmegaConf

from optkit.config.compose import compose, group_choices
from optkit.config.schema import OptConfig
from optkit.families import UnknownModelError
from optkit.models import build_model
from optkit.opt import edits
from optkit.opt.edits import PatchConflict, replace_module
from optkit.opt.patcher import patch, patch_log, unpatch
from optkit.opt.registry import (
    REGISTRY,
    MissingRequirement,
    enabled_names,
    load_opt_config,
    missing_requirements,
    switch_value,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2")
KERNELS_ON = {
    "kernels": {
        "rms_norm": True,
        "rope": True,
        "swiglu": True,
        "geglu": True,
        "cross_entropy": True,
        "fused_linear_cross_entropy": True,
    }
}
REQUIREMENTS = {"cuda", "triton", "bitsandbytes", "liger", "unsloth", "moe", "packing", "lora"}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton on CPU tensors only under the interpreter


def _tiny(family="llama", seed=0):
    return build_model(compose([f"model=tiny_{family}"]).model, device=DEVICE, seed=seed)


def _ids(model, seed=0, seq=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, seq), generator=gen).to(DEVICE)


# ---- registry --------------------------------------------------------------------------------------


def _presets_turning_on(config_key):
    on = []
    for name in group_choices("opt"):
        cfg = load_opt_config(name)
        if switch_value(cfg, config_key) is True:
            on.append(name)
    return on


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_optimization_has_config_field_yaml_and_description(name):
    opt = REGISTRY[name]
    assert opt.name == name
    assert switch_value(OptConfig(), opt.config_key) is False, f"OptConfig.{opt.config_key} must default off"
    assert _presets_turning_on(opt.config_key), f"no conf/opt/*.yaml turns on opt.{opt.config_key}"
    assert opt.description and "\n" not in opt.description
    assert set(opt.requires) <= REQUIREMENTS, opt.requires
    for fn in (opt.apply, opt.unapply):  # real references into opt/, one module per optimization
        if fn is not None:
            assert callable(fn) and fn.__module__.startswith("optkit.opt."), fn


def test_registry_order_applies_compile_last_and_covers_every_switch():
    assert list(REGISTRY)[-1] == "compile"
    switches = {f"kernels.{f.name}" for f in dataclasses.fields(OptConfig().kernels)}
    switches |= {f.name for f in dataclasses.fields(OptConfig) if f.type in ("bool", bool)}
    assert switches == {o.config_key for o in REGISTRY.values()}


def test_presets_load_without_hydra_and_enable_what_they_say():
    assert enabled_names("baseline") == []
    assert enabled_names("liger") == ["liger"]
    assert enabled_names("compile") == ["compile"]
    assert enabled_names("kernels") == [
        "rms_norm",
        "rope",
        "swiglu",
        "geglu",
        "cross_entropy",
        "fused_linear_cross_entropy",
    ]
    assert "compile" not in enabled_names("full") and enabled_names("full_compile")[-1] == "compile"
    # every accepted form of the same config gives the same answer
    dict_cfg = {"kernels": {"rope": True}, "compile": True}
    assert enabled_names(dict_cfg) == enabled_names(OmegaConf.create(dict_cfg)) == ["rope", "compile"]
    assert enabled_names(compose(["opt=kernels"]).opt) == enabled_names("kernels")


def test_bad_opt_configs_say_what_to_do():
    with pytest.raises(ValueError, match="choose one of: .*baseline"):
        load_opt_config("fulll")
    with pytest.raises(ValueError, match="rms_nrom"):
        load_opt_config({"kernels": {"rms_nrom": True}})


# ---- patch / unpatch ---------------------------------------------------------------------------------


def test_patch_is_idempotent():
    model = _tiny()
    patch(model, KERNELS_ON)
    modules, log = dict(model.named_modules()), patch_log(model)
    n_changes = len(model.__dict__["_optkit_patch"].changes)
    assert patch(model, KERNELS_ON) is model
    assert dict(model.named_modules()) == modules and patch_log(model) == log
    assert len(model.__dict__["_optkit_patch"].changes) == n_changes


def test_unpatch_restores_the_very_modules_state_dict_and_outputs():
    model = _tiny("qwen3")
    ids = _ids(model)
    modules = dict(model.named_modules())
    state = {k: v for k, v in model.state_dict().items()}
    before = model(input_ids=ids, labels=ids)
    patch(model, KERNELS_ON)
    assert model.state_dict().keys() == state.keys(), "patching must keep state-dict keys"
    assert all(model.state_dict()[k] is v or torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert type(model.model.layers[0].self_attn.q_norm).__name__ == "RMSNorm"  # Qwen3's q/k norms too
    unpatch(model)
    assert all(a is b for a, b in zip(dict(model.named_modules()).values(), modules.values()))
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all("forward" not in m.__dict__ for m in model.modules()), "an instance forward was left behind"
    assert "_optkit_patch" not in model.__dict__ and "_loss_function" not in model.__dict__
    after = model(input_ids=ids, labels=ids)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)
    assert patch_log(model) == []


def test_patching_is_per_instance():
    from transformers.models.llama import modeling_llama

    rope_global, forward = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaAttention.forward
    patched, untouched = _tiny(seed=1), _tiny(seed=1)
    reference = copy.deepcopy(untouched)
    patch(patched, KERNELS_ON)
    assert modeling_llama.apply_rotary_pos_emb is rope_global and modeling_llama.LlamaAttention.forward is forward
    assert all(type(a) is type(b) for a, b in zip(untouched.modules(), reference.modules()))
    assert all("forward" not in m.__dict__ for m in untouched.modules())
    ids = _ids(untouched)
    assert torch.equal(untouched(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_rope_runs_optkit_kernel_through_the_instance_forward(monkeypatch):
    import optkit.kernels.rope as rope

    calls = []
    kernel = rope.apply_rotary
    monkeypatch.setattr(rope, "apply_rotary", lambda *a: calls.append(1) or kernel(*a))
    model = patch(_tiny("gemma2"), {"kernels": {"rope": True}})
    model(input_ids=_ids(model))
    assert len(calls) == model.config.num_hidden_layers


def test_deepcopy_of_a_patched_model_unpatches_on_its_own():
    model = patch(_tiny(), KERNELS_ON)
    clone = copy.deepcopy(model)
    unpatch(clone)
    assert type(clone.model.norm).__name__ == "LlamaRMSNorm"
    assert type(model.model.norm).__name__ == "RMSNorm", "unpatching the copy touched the original"


def test_a_failing_optimization_leaves_the_model_as_it_was(monkeypatch):
    model = _tiny()
    modules = dict(model.named_modules())
    broken = dataclasses.replace(REGISTRY["swiglu"], apply=_explode)
    monkeypatch.setitem(REGISTRY, "swiglu", broken)
    with pytest.raises(RuntimeError, match="boom"):
        patch(model, KERNELS_ON)  # rms_norm and rope ran before swiglu failed
    assert dict(model.named_modules()) == modules and "_optkit_patch" not in model.__dict__
    assert all("forward" not in m.__dict__ for m in model.modules())


def _explode(model, opt_cfg):
    raise RuntimeError("boom")


def test_two_optimizations_claiming_one_module_is_an_error():
    model = patch(_tiny(), {"kernels": {"swiglu": True}})
    with pytest.raises(
        PatchConflict, match=r"geglu and swiglu both replace model\.layers\.0\.mlp.*opt\.kernels\.swiglu=false"
    ):
        replace_module(model, "model.layers.0.mlp", torch.nn.Identity(), by="geglu")


def test_liger_and_optkit_kernels_conflict(monkeypatch):
    state = edits.PatchState()
    state.claim("model.norm", "rms_norm")
    with pytest.raises(PatchConflict, match="liger and rms_norm both replace the whole model"):
        state.claim("*", "liger")


def test_optimizations_that_do_not_apply_are_skipped_with_a_log_line():
    model = patch(_tiny("llama"), {"kernels": {"geglu": True}, "moe_sorted_routing": True, "fused_lora": True})
    log = patch_log(model)
    assert "geglu: skipped (applies to gemma2, not llama)" in log
    assert "moe_sorted_routing: skipped (the model has no MoE layers)" in log
    assert any(line.startswith("fused_lora: skipped (the model has no LoRA adapters;") for line in log), log


# ---- requirements and families ------------------------------------------------------------------------


def test_missing_liger_is_a_clear_missing_requirement(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "liger_kernel" else real_find_spec(n, *a)
    )
    assert missing_requirements("liger") == ["liger: liger-kernel is not installed (pip install liger-kernel)"]
    assert missing_requirements("full") == []
    with pytest.raises(MissingRequirement, match="pip install liger-kernel"):
        patch(_tiny(), "liger")


def test_triton_kernels_on_cpu_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    messages = missing_requirements("kernels", device="cpu")
    assert len(messages) == 1 and "TRITON_INTERPRET=1" in messages[0]
    assert messages[0].startswith(", ".join(enabled_names("kernels")) + ": ")
    assert missing_requirements("baseline", device="cpu") == [] and missing_requirements("compile", device="cpu") == []


def test_unsupported_family_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).to(DEVICE)
    with pytest.raises(UnknownModelError, match="gpt2.*supported: gemma2, llama, mistral, qwen2, qwen3, qwen3_moe"):
        patch(model, "kernels")
    assert patch(model, "baseline") is model and patch_log(model) == []


def test_compile_is_in_place_and_unpatched(monkeypatch):
    model = _tiny()
    patch(model, {"compile": True, "compile_mode": "reduce-overhead"})  # lazy: nothing compiles until a call
    assert model._compiled_call_impl is not None
    assert patch_log(model) == [
        "compile: compiled the whole model (torch.compile of LlamaForCausalLM, mode=reduce-overhead)"
    ]
    with pytest.raises(PatchConflict, match="already compiled"):
        patch(model, {"kernels": {"rms_norm": True}, "compile": True})
    unpatch(model)
    assert model._compiled_call_impl is None


# ---- the fused loss's contract --------------------------------------------------------------------------


def test_fused_loss_returns_no_logits_in_training_and_logits_when_asked():
    model = _tiny("gemma2").train()
    reference = copy.deepcopy(model)
    patch(model, {"kernels": {"fused_linear_cross_entropy": True}})
    ids = _ids(model)
    fused = model(input_ids=ids, labels=ids)
    assert fused.logits is None and fused.loss.dtype == torch.float32
    asked = model(ids, labels=ids, return_logits=True)  # positional input_ids, as users write it
    expected = reference(input_ids=ids, labels=ids)
    assert torch.allclose(asked.logits, expected.logits) and torch.allclose(asked.loss, expected.loss)
    assert torch.allclose(fused.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert model.eval()(input_ids=ids, labels=ids).logits is not None  # evaluation keeps its logits
    assert model(input_ids=ids).logits is not None
    as_tuple = model.train()(input_ids=ids, labels=ids, return_dict=False)
    assert torch.allclose(as_tuple[0], fused.loss)


def test_fused_loss_forward_keeps_the_hf_signature_and_takes_positional_arguments():
    # HF's Trainer keeps the dataset columns the forward's signature names (remove_unused_columns) and passes
    # num_items_in_batch only to a forward taking **kwargs
    model = _tiny().train()
    hf_signature = inspect.signature(type(model).forward)
    patch(model, {"kernels": {"fused_linear_cross_entropy": True}})
    assert "forward" in model.__dict__
    assert list(inspect.signature(model.forward).parameters) == list(hf_signature.parameters)[1:]
    ids = _ids(model)
    mask = torch.ones_like(ids)
    by_name = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert torch.equal(model(ids, mask, labels=ids).loss, by_name)
    with pytest.raises(TypeError, match="multiple values for argument 'input_ids'"):
        model(ids, input_ids=ids, labels=ids)


def test_a_deepcopy_of_the_fused_loss_forward_runs_the_copy():
    model = patch(_tiny().train(), {"kernels": {"fused_linear_cross_entropy": True}})
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lm_head.weight.mul_(2)
    ids = _ids(model)
    assert not torch.allclose(clone(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss)
    assert not torch.allclose(clone.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_fused_lm_head_calls_go_to_the_foreign_head_and_say_so_once():
    # TRL's SFTTrainer installs its own forward (model(..., fused_lm_head=True) returns its per-token outputs):
    # before optkit's (optkit patched after the trainer) or over it (optkit patched first)
    ids = _ids(_tiny())
    line = "fused_linear_cross_entropy: not used for calls with fused_lm_head=True"
    for order in ("head first", "optkit first"):
        model = _tiny().train()
        if order == "head first":
            model.forward = _foreign_head(model, model.forward)
            patch(model, {"kernels": {"fused_linear_cross_entropy": True}})
        else:
            patch(model, {"kernels": {"fused_linear_cross_entropy": True}})
            model.forward = _foreign_head(model, model.forward)
        assert model(input_ids=ids, labels=ids, fused_lm_head=True) == "foreign head"
        assert model(input_ids=ids, labels=ids, fused_lm_head=True) == "foreign head"
        assert sum(entry.startswith(line) for entry in patch_log(model)) == 1, (order, patch_log(model))
        assert model(input_ids=ids, labels=ids).logits is None  # calls without it: optkit's fused loss


def _foreign_head(model, underneath):
    def forward(*args, fused_lm_head=False, **kwargs):
        return "foreign head" if fused_lm_head else underneath(*args, **kwargs)

    return forward


def test_fused_loss_keeps_the_moe_auxiliary_loss():
    model = _tiny("qwen3_moe").train()
    model.config.output_router_logits = True
    reference = copy.deepcopy(model)
    patch(model, {"kernels": {"fused_linear_cross_entropy": True}})
    ids = _ids(model)
    fused, expected = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    assert fused.logits is None and fused.router_logits is not None
    assert torch.allclose(fused.aux_loss, expected.aux_loss)
    assert torch.allclose(fused.loss, expected.loss, rtol=1e-5, atol=1e-6)


def test_fused_loss_is_skipped_for_a_peft_wrapped_lm_head():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    patch(model, {"kernels": {"fused_linear_cross_entropy": True}})
    assert patch_log(model)[0].startswith("fused_linear_cross_entropy: skipped (lm_head is")
    assert "_optkit_patch" in model.__dict__ and "forward" not in model.get_base_model().__dict__


def test_peft_model_is_patched_inside_and_unpatched():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny(), LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"]))
    gate = model.get_base_model().model.layers[1].mlp.gate_proj
    patch(model, KERNELS_ON)
    assert model.get_base_model().model.layers[1].mlp.gate_proj is gate
    assert "forward" in model.get_base_model().__dict__  # the fused loss sits on the HF model
    unpatch(model)
    assert type(model.get_base_model().model.layers[1].mlp).__name__ == "LlamaMLP"
    assert "forward" not in model.get_base_model().__dict__


# ---- opt=full on every family ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_full_patches_every_family_trains_a_step_and_unpatches(family):
    cfg = load_opt_config("full")
    model = _tiny(family).train()
    modules, attn_implementation = dict(model.named_modules()), model.config._attn_implementation
    hooks = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())  # noqa: E731
    n_hooks = hooks()
    patch(model, cfg)
    log = patch_log(model)
    for name in enabled_names(cfg):
        assert any(line.startswith(f"{name}: ") for line in log), f"{name} left no log line: {log}"
    ids = _ids(model)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    unpatch(model)
    assert dict(model.named_modules()) == modules, "unpatch left a swapped module behind"
    assert model.config._attn_implementation == attn_implementation and hooks() == n_hooks
    assert all("forward" not in m.__dict__ for m in model.modules())
