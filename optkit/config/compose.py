"""Compose optkit's Hydra config from conf/ plus command-line style overrides.

The compose API is used instead of ``@hydra.main`` so that one process can compose many points
(the runner) and so that ``optkit`` keeps ordinary subcommands; each point still runs in its own
subprocess. Errors name the valid choices: Hydra lists a group's options, and the structured schema
rejects unknown keys.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable, List

from omegaconf import DictConfig, OmegaConf

from optkit.config.keys import check_override
from optkit.config.schema import OptkitConfig, register_configs

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("model", "opt", "train", "data", "suite")


class ConfigError(ValueError):
    """A config that cannot be composed; the message says what to change."""


def group_choices(group: str) -> List[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose(overrides: Iterable[str] = ()) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    _check_group_choices(overrides)
    _check_keys(overrides)
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(f"bad config ({' '.join(overrides) or 'defaults'}): {_one_line(exc)}") from exc
    finally:
        GlobalHydra.instance().clear()
    try:  # run the dataclasses' __post_init__ checks on the composed values
        OmegaConf.to_object(cfg)
    except (ValueError, OmegaConfBaseException) as exc:
        raise ConfigError(str(exc)) from exc
    _check_across_groups(cfg)
    return cfg


def _check_across_groups(cfg: DictConfig) -> None:
    """Checks that need two groups at once (each dataclass only sees its own fields)."""
    hf = cfg.model.get("hf_config") or {}
    max_positions = hf.get("max_position_embeddings")
    if max_positions and cfg.data.seq_len > max_positions:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model {cfg.model.name!r}'s max_position_embeddings="
            f"{max_positions}: lower data.seq_len, or raise model.hf_config.max_position_embeddings if the model "
            "really supports longer sequences (RoPE scaling)"
        )


def _check_group_choices(overrides: List[str]) -> None:
    """A clear message for `model=llama9` before Hydra's longer one."""
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in GROUPS or value in group_choices(key):
            continue
        if "," in value and set(value.split(",")) <= set(group_choices(key)):
            raise ConfigError(
                f"{item}: a comma list sweeps a suite's axis; add suite=NAME (e.g. suite=smoke {item}), "
                f"or give one {key}"
            )
        guess = difflib.get_close_matches(value, group_choices(key), n=1)
        hint = f"did you mean {guess[0]}? " if guess else ""
        raise ConfigError(f"{key} {value!r} unknown; {hint}choose one of: {', '.join(group_choices(key))}")


def _one_line(exc: BaseException) -> str:
    """Hydra's message on one line, without its grammar pointer (a line of spaces and '^') and doc link."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line.strip("^ ") and not line.startswith("See https://")]
    return " ".join(kept) or type(exc).__name__


def _check_keys(overrides: List[str]) -> None:
    """Unknown keys (with the closest valid one), '+' on the schema's groups, values of the wrong type."""
    for item in overrides:
        problem = check_override(item, GROUPS)
        if problem:
            raise ConfigError(problem)


def typed_config(config) -> OptkitConfig:
    """The schema's dataclasses, checked, from a resolved config (a DictConfig or the dict a point is handed)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptkitConfig), config))


def compose_preset(group: str, name: str) -> DictConfig:
    """One group's preset as composed (its defaults list applied), e.g. ``compose_preset("opt", "full")``."""
    if name not in group_choices(group):
        raise ConfigError(f"{group} preset {name!r} unknown; choose one of: {', '.join(group_choices(group))}")
    return compose([f"{group}={name}"])[group]


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
