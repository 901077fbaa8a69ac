"""Switch optkit's optimizations (and its peers') into an HF model instance, chosen by config.

``optkit.patch(model, "full")`` works on a model from ``optkit.models.build_model``, on a user's own
``AutoModelForCausalLM`` and on a peft ``PeftModel``. Everything is per instance: modules are swapped
(``RMSNorm.from_module`` shares the HF weight, so state-dict keys and optimizer state carry over),
forwards are replaced on the instance, and no HF class or module-level function is edited, so two
models in one process can differ. Every change is recorded with the exact object it replaced
(opt/edits.py), which is what ``unpatch`` puts back. Patching twice is patching once.

Two optimizations claiming the same module (or the same instance attribute) is an error; one that
does not apply to the model's family (geglu on Llama) is skipped with a log line, so ``opt=full``
works on every family. The optimizations are applied in registry order (opt/registry.py).
"""

from __future__ import annotations

import os
import sys
from typing import Any, List, Optional

from torch import nn

from optkit.opt.edits import (
    CALL_UNAPPLY,
    STATE_ATTR,
    PatchConflict,
    PatchState,
    family_of_patched,
    hf_model_of,
    is_moe,
    patch_root,
    state_of,
    undo,
)
from optkit.opt.registry import (
    REGISTRY,
    MissingRequirement,
    Optimization,
    enabled_names,
    load_opt_config,
    missing_requirements,
)
from optkit.train.distributed import refuse_sharded


def _skip_reason(opt: Optimization, model: nn.Module, family: Optional[str]) -> Optional[str]:
    if opt.families is not None and family not in opt.families:
        return f"applies to {', '.join(opt.families)}, not {family}"
    if "moe" in opt.requires and not is_moe(hf_model_of(model)):
        return "the model has no MoE layers"
    if "lora" in opt.requires and not _has_lora(model):
        return _NO_LORA
    return None


# The one skip that a later call can lift: adapters added after patching (optkit.patch, then get_peft_model).
_NO_LORA = "the model has no LoRA adapters; call optkit.patch again after get_peft_model to fuse them"


def _has_lora(model: nn.Module) -> bool:
    return any(hasattr(m, "lora_A") for m in model.modules())


def _pending(name: str, state: Optional[PatchState], model: nn.Module) -> bool:
    """Whether ``patch`` has ``name`` still to do: never done, or skipped for want of adapters it now has."""
    if state is None or name not in state.logs:
        return True
    return state.logs[name] == [f"{name}: skipped ({_NO_LORA})"] and _has_lora(model)


def _late_interpreter(todo: List[str]) -> List[str]:
    """TRITON_INTERPRET=1 set after triton was imported leaves triton's own helpers (tl.sum, ...) compiled, and
    every interpreted kernel then fails deep inside its first launch; say it here, in one line."""
    standard = sys.modules.get("triton.language.standard")
    if (
        os.environ.get("TRITON_INTERPRET") != "1"
        or standard is None
        or not any("triton" in REGISTRY[n].requires for n in todo)
    ):
        return []
    if type(getattr(standard, "sum", None)).__name__ != "JITFunction":
        return []
    return [
        "TRITON_INTERPRET=1 was set after triton was imported (transformers imports it): set it before importing "
        "transformers (or in the shell), or patch without optkit's kernels"
    ]


def patch(model: nn.Module, opt_cfg: Any = "full") -> nn.Module:
    """Apply every optimization enabled in ``opt_cfg`` to ``model`` (in place) and return it."""
    cfg = load_opt_config(opt_cfg)
    names = enabled_names(cfg)
    refuse_sharded(model)  # patch goes before fully_shard (optkit/train/distributed.py says why)
    root = patch_root(model)
    if root is not model:  # patched before get_peft_model: the rest goes where the first patch went
        patch(root, cfg)
        return model
    state = state_of(model)
    todo = [n for n in names if _pending(n, state, model)]
    if not todo:
        return model
    missing = missing_requirements(cfg, model=model) + _late_interpreter(todo)
    if missing:
        raise MissingRequirement("; ".join(missing))
    needs_family = any(not REGISTRY[n].peer for n in todo)  # peers work on any HF model
    family = family_of_patched(model) if needs_family else None
    if state is None:
        state = PatchState(switches={name: opt.config_key for name, opt in REGISTRY.items()})
        model.__dict__[STATE_ATTR] = state
    if "compile" in state.logs:
        raise PatchConflict(
            f"the model is already compiled; unpatch it first, then patch {', '.join(todo)} "
            "and compile in one call (compile must come last)"
        )
    n_changes, n_claims = len(state.changes), dict(state.claims)
    try:
        for name in todo:
            opt = REGISTRY[name]
            reason = _skip_reason(opt, model, family)
            if reason:
                lines = [f"skipped ({reason})"]
            else:
                if opt.unapply:  # recorded first, so a failing apply is cleaned up too
                    state.changes.append(("", CALL_UNAPPLY, False, opt.unapply))
                lines = list(opt.apply(model, cfg))
            state.logs[name] = [line if line.startswith(f"{name}: ") else f"{name}: {line}" for line in lines]
    except BaseException:  # leave the model as it was before this call
        undo(model, state.changes[n_changes:])
        del state.changes[n_changes:]
        state.claims = n_claims
        for name in todo:
            state.logs.pop(name, None)
        if not state.logs:
            del model.__dict__[STATE_ATTR]
        raise
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put back every module and attribute ``patch`` changed (the very objects it replaced)."""
    root = patch_root(model)
    state = state_of(root)
    if state is not None:
        undo(root, state.changes)
        del root.__dict__[STATE_ATTR]
    return model


def patch_log(model: nn.Module) -> List[str]:
    """What ``patch`` did to ``model``, one line per change or skip, in application order."""
    state = state_of(patch_root(model))
    return [line for lines in state.logs.values() for line in lines] if state else []


def applied_names(model: nn.Module) -> List[str]:
    """The optimizations ``patch`` applied to ``model`` (not the skipped ones), in application order."""
    state = state_of(patch_root(model))
    if state is None:
        return []
    return [
        name for name, lines in state.logs.items() if not any(line.startswith(f"{name}: skipped") for line in lines)
    ]
