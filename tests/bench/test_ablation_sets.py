"""The ablation suite's opt-sets: each optimization alone on, and its difference to opt=full."""

from omegaconf import OmegaConf

from optkit.bench.runner import ablation_opt_overrides
from optkit.config.compose import compose


def _names(sets):
    return {next((o.split("=", 1)[1] for o in s if o.startswith("opt.name=")), s[0].split("=", 1)[1]): s for s in sets}


def test_a_switch_full_turns_on_is_ablated_off_and_one_it_leaves_off_is_added():
    sets = _names(ablation_opt_overrides("llama3_8b"))
    full = compose(["opt=full"]).opt
    assert full.recompute_skips_mlp_down and not full.fused_lora_grouped_gemm
    assert sets["full_minus_recompute_skips_mlp_down"][-1] == "opt.recompute_skips_mlp_down=false"
    assert sets["full_plus_fused_lora_grouped_gemm"][-1] == "opt.fused_lora_grouped_gemm=true"
    assert "full_minus_fused_lora_grouped_gemm" not in sets
    assert {"baseline", "full", "only_fused_lora_grouped_gemm"} <= set(sets)
    for name, overrides in sets.items():  # every set composes, and none but full is opt=full under another name
        opt = OmegaConf.to_container(compose(overrides).opt)
        assert opt.pop("name") == name
        assert (opt == {k: v for k, v in OmegaConf.to_container(full).items() if k != "name"}) == (name == "full"), name
