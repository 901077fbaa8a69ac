"""Checks of a composed point that need more than its own values: the checkpoint on disk, the model's layer
count and the module names LoRA targets. The runner makes them for every point before any point process
starts, so a bad path or a mistyped target is one line at once instead of N failed subprocesses."""

from __future__ import annotations

import difflib
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, FrozenSet, Optional

from omegaconf import OmegaConf

from optkit.config.compose import ConfigError
from optkit.config.schema import TrainConfig
from optkit.families import FAMILIES

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
EXPERTS_TARGET = "experts"  # optkit's own expert LoRA (optkit.train.moe), not a module name
ADAPTER_METHODS = ("lora", "qlora")


def check_point(cfg) -> None:
    """Raise ConfigError (one line naming the fix) for what would fail the point's process anyway."""
    hf_config = checkpoint_config(cfg.model.path) if cfg.model.path else _plain(cfg.model.hf_config)
    family = hf_config.get("model_type", cfg.model.family) if cfg.model.path else cfg.model.family
    _check_num_layers(cfg.model, hf_config)
    if cfg.bench.gpus > 1 and cfg.train.distributed == "none":
        raise ConfigError(f"bench.gpus={cfg.bench.gpus} needs train.distributed=ddp or train.distributed=fsdp2")
    if cfg.train.sharded_init and cfg.model.path:
        raise ConfigError("train.sharded_init initializes random weights: drop it to load model.path")
    if cfg.train.method in ADAPTER_METHODS:
        _check_lora_targets(list(cfg.train.lora_targets), family, hf_config, cfg.model)


def checkpoint_config(path_text: str) -> Dict[str, Any]:
    """The config.json of ``model.path``, checked: a directory with a readable, parseable config.json of a
    supported family, and weight files beside it."""
    path = Path(path_text).expanduser()
    where = f"model.path={path_text}"
    if not path.exists():
        raise ConfigError(f"{where} does not exist: pass a local checkpoint directory (config.json + weights)")
    if not path.is_dir():
        raise ConfigError(f"{where} is a file: pass the checkpoint's directory, the one holding config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{where} has no config.json: pass the checkpoint's directory (config.json + weights)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {config_file}: {exc.strerror}; fix its permissions") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_file} is not valid JSON ({exc}): re-download or repair the checkpoint") from exc
    if not isinstance(config, dict) or config.get("model_type") not in FAMILIES:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise ConfigError(f"{config_file}: model_type {found!r} is not supported; supported: {', '.join(FAMILIES)}")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ConfigError(f"{where} holds no weights (*.safetensors, *.bin): pass a complete checkpoint")
    return config


def _plain(node) -> Dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})


def _check_num_layers(model_cfg, hf_config: Dict[str, Any]) -> None:
    published = hf_config.get("num_hidden_layers")
    if model_cfg.num_layers is not None and published and model_cfg.num_layers > published:
        raise ConfigError(
            f"model.num_layers={model_cfg.num_layers} exceeds the {published} layers of {model_cfg.name!r}: "
            f"it cuts a model, so use at most {published} (or null for all)"
        )


def _check_lora_targets(targets, family: str, hf_config: Dict[str, Any], model_cfg) -> None:
    if EXPERTS_TARGET in targets and not FAMILIES[family].moe:
        raise ConfigError(
            f"train.lora_targets has {EXPERTS_TARGET!r} but {model_cfg.name!r} ({family}) has no MoE experts: drop it"
        )
    plain = [t for t in targets if t != EXPERTS_TARGET]
    if not plain or any(not re.fullmatch(r"\w+", t) for t in plain):
        return  # expert LoRA alone, or peft's full-name / regex targets: peft matches those itself
    names = linear_module_names(family, json.dumps(hf_config, sort_keys=True, default=str))
    if names is None:
        return
    known = sorted(names)
    usual = set(TrainConfig().lora_targets)  # family-agnostic defaults: a MoE model lacks gate_proj, fine
    for target in plain:
        if target not in names and target not in usual:
            guess = difflib.get_close_matches(target, known, n=1)
            hint = f"did you mean {guess[0]}? " if guess else ""
            raise ConfigError(
                f"train.lora_targets: {target!r} is no module of {model_cfg.name!r}; {hint}its linear modules: "
                + ", ".join(known)
            )
    if not set(plain) & names and EXPERTS_TARGET not in targets:
        raise ConfigError(
            f"train.lora_targets={plain} names no module of {model_cfg.name!r}; its linear modules: {', '.join(known)}"
        )


@lru_cache(maxsize=32)
def linear_module_names(family: str, hf_config_json: str) -> Optional[FrozenSet[str]]:
    """Last names of the nn.Linear modules of a one-layer copy of the model, built on the meta device (no
    memory, no weights); None when it cannot be built here (the point's process will say why)."""
    import torch

    from optkit.models import build_hf_config

    try:
        from optkit.families import family_classes

        _, model_cls = family_classes(family)
        config = build_hf_config(family, json.loads(hf_config_json), num_layers=1)
        with torch.device("meta"):
            model = model_cls(config)
    except Exception:  # noqa: BLE001 - a shape this check cannot build is the point process's to report
        return None
    return frozenset(name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear))
