"""Every YAML composes against the schema; bad input gives errors that list the valid choices."""

import pytest

from optkit.config.compose import CONF_DIR, ConfigError, compose, group_choices

GROUPS = ("model", "opt", "train", "data", "suite")


@pytest.mark.parametrize("group", GROUPS)
def test_every_yaml_composes(group):
    names = group_choices(group)
    assert names, f"conf/{group}/ is empty"
    for name in names:
        cfg = compose([f"{group}={name}"])
        assert cfg[group] is not None


def test_command_line_overrides_reach_the_config():
    cfg = compose(["model=llama3_8b", "opt=baseline", "train.batch_size=4", "data.seq_len=2048"])
    assert (cfg.model.name, cfg.opt.name, cfg.train.batch_size, cfg.data.seq_len) == ("llama3_8b", "baseline", 4, 2048)
    assert cfg.model.hf_config.hidden_size == 4096


@pytest.mark.parametrize("group", ["model", "opt", "suite", "train", "data"])
def test_unknown_group_choice_lists_valid_ones(group):
    with pytest.raises(ConfigError) as err:
        compose([f"{group}=no_such_thing"])
    message = str(err.value)
    assert "no_such_thing" in message
    for valid in group_choices(group):
        assert valid in message


@pytest.mark.parametrize("override", ["train.batchsize=4", "opt.kernels.rmsnorm=true", "model.hidden=3"])
def test_typo_in_a_key_is_an_error(override):
    with pytest.raises(ConfigError):
        compose([override])


@pytest.mark.parametrize(
    "override,valid",
    [
        ("train.method=lorra", "qlora"),
        ("train.checkpointing=yes", "offload_double_buffer"),
        ("train.optimizer=sgd", "paged_adamw_8bit"),
        ("model.dtype=fp8", "bfloat16"),
        ("bench.device=tpu", "cuda"),
    ],
)
def test_bad_value_lists_valid_ones(override, valid):
    with pytest.raises(ConfigError) as err:
        compose([override])
    assert valid in str(err.value)


def test_bad_numbers_are_rejected():
    for override in ("train.batch_size=0", "data.seq_len=0", "train.steps=0", "data.pad_fraction=1.5"):
        with pytest.raises(ConfigError):
            compose([override])


def test_baseline_is_all_off_and_full_turns_kernels_on():
    base, full = compose(["opt=baseline"]).opt, compose(["opt=full"]).opt
    assert not any(base.kernels.values()) and not base.fused_lora and not base.compile
    assert full.kernels.rms_norm and full.kernels.fused_linear_cross_entropy and full.fused_lora


def test_model_zoo_has_the_required_entries():
    required = {
        "llama3_8b",
        "llama3_2_1b",
        "llama3_2_3b",
        "mistral_7b",
        "qwen2_5_7b",
        "qwen3_8b",
        "qwen3_14b",
        "qwen3_moe_30b_a3b",
        "gemma2_9b",
        "tiny_llama",
        "tiny_qwen3",
        "tiny_qwen3_moe",
        "tiny_gemma2",
    }
    assert required <= set(group_choices("model"))
    assert (CONF_DIR / "config.yaml").exists()


def test_seq_len_beyond_the_models_positions_is_a_config_error():
    with pytest.raises(ConfigError, match="max_position_embeddings=8192"):
        compose(["model=llama3_8b", "data.seq_len=16384"])
    assert compose(["model=llama3_8b", "data.seq_len=8192"]).data.seq_len == 8192
