"""What a patch knows about the model it changes: the HF model inside it and its family, the claims
(which optimization replaced which module or attribute) and the record of every change, with the
exact object it replaced, which ``unpatch`` puts back. ``replace_module`` and ``override_attr`` are
the only ways the apply functions change a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from optkit.patch_registry import REGISTRY, _resolve

_STATE_ATTR = "_optkit_patch"
_CALL_UNAPPLY = "<unapply>"  # a change record that calls an optimization's unapply function


class PatchConflict(RuntimeError):
    """Two enabled optimizations replace the same module or attribute."""



@dataclass
class _PatchState:
    logs: Dict[str, List[str]] = field(default_factory=dict)  # optimization -> its log lines, in order
    claims: Dict[str, str] = field(default_factory=dict)  # "path" or "path.attr" -> optimization
    # (owner path from the root, attribute, whether the owner had it in its __dict__/_modules, original)
    changes: List[Tuple[str, str, bool, Any]] = field(default_factory=list)

    def claim(self, key: str, by: str) -> None:
        others = {owner for k, owner in self.claims.items() if owner != by and (k in (key, "*") or key == "*")}
        if others:
            other = sorted(others)[0]
            what = "the whole model" if "*" in (key, *[k for k, o in self.claims.items() if o == other]) else key
            raise PatchConflict(
                f"{by} and {other} both replace {what}; turn one of them off "
                f"(opt.{REGISTRY[by].config_key}=false or opt.{REGISTRY[other].config_key}=false)"
            )
        self.claims[key] = by


def _state_of(root: nn.Module) -> Optional[_PatchState]:
    return root.__dict__.get(_STATE_ATTR)  # not getattr: PeftModel forwards unknown names to the base model


def hf_model_of(model: nn.Module) -> nn.Module:
    """The HF PreTrainedModel inside ``model`` (itself, or a PeftModel's base model)."""
    get_base_model = getattr(type(model), "get_base_model", None)
    return get_base_model(model) if get_base_model is not None else model


def _path_of(root: nn.Module, module: nn.Module) -> str:
    for path, candidate in root.named_modules(remove_duplicate=False):
        if candidate is module:
            return path
    raise ValueError(f"{type(module).__name__} is not a submodule of the model being patched")


def _join(path: str, attr: str) -> str:
    return f"{path}.{attr}" if path else attr


def _record(root: nn.Module, owner: nn.Module, attr: str, by: Optional[str], claim_key: Optional[str] = None) -> None:
    """Claim ``owner.attr`` for ``by`` (None: no claim) and remember its value, before the caller changes it."""
    state = _state_of(root)
    path = _path_of(root, owner)
    if by is not None:
        state.claim(claim_key if claim_key is not None else _join(path, attr), by)
    if attr in owner._modules:
        state.changes.append((path, attr, True, owner._modules[attr]))
    else:
        state.changes.append((path, attr, attr in owner.__dict__, owner.__dict__.get(attr)))


def replace_module(root: nn.Module, path: str, new_module: nn.Module, by: str) -> nn.Module:
    """Swap the submodule at ``path`` (relative to ``root``) for ``new_module``; undone by ``unpatch``."""
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path)
    _record(root, parent, attr, by, claim_key=path)
    old = parent._modules[attr]
    new_module.train(old.training)
    setattr(parent, attr, new_module)
    return old


def override_attr(root: nn.Module, owner: nn.Module, attr: str, value: Any, by: str) -> None:
    """Set an instance attribute (a ``forward``, ``_loss_function``...) of ``owner``; undone by ``unpatch``."""
    _record(root, owner, attr, by)
    setattr(owner, attr, value)


def _undo(root: nn.Module, changes: List[Tuple[str, str, bool, Any]]) -> None:
    for path, attr, existed, original in reversed(changes):
        if attr == _CALL_UNAPPLY:
            _resolve(original)(root)
            continue
        owner = root.get_submodule(path)
        if isinstance(original, nn.Module):
            original.train(owner._modules[attr].training if attr in owner._modules else owner.training)
        if existed:
            setattr(owner, attr, original)
        elif attr in owner.__dict__ or attr in owner._modules:
            delattr(owner, attr)


def family_of_patched(model: nn.Module) -> str:
    """The family of the HF model inside ``model``; a clear error names the supported ones."""
    from optkit.models import UnknownModelError, family_of

    hf = hf_model_of(model)
    try:
        return family_of(hf)
    except UnknownModelError as exc:
        raise UnknownModelError(
            f"optkit.patch cannot patch {type(hf).__name__}: {exc}. Use opt=baseline (or only opt.compile) "
            "for other models"
        ) from None



def _is_moe(hf: nn.Module) -> bool:
    config = getattr(hf, "config", None)
    return bool(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0))
