"""How optimizations change a model, and the record that undoes it.

What a patch knows about the model it changes: the HF model inside it and its family, the claims
(which optimization replaced which module or attribute) and the record of every change, with the
exact object it replaced, which ``unpatch`` puts back. ``replace_module``, ``override_attr`` and
``rebind_attention_globals`` are the only ways the apply functions change a model (an optimization
with its own undo registers it as ``unapply`` in the registry).
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

from optkit.families import UnknownModelError, family_of, get_family

STATE_ATTR = "_optkit_patch"
logger = logging.getLogger("optkit")
CALL_UNAPPLY = "<unapply>"  # a change record whose "original" is an optimization's unapply function


class PatchConflict(RuntimeError):
    """Two enabled optimizations replace the same module or attribute."""


@dataclass
class PatchState:
    logs: Dict[str, List[str]] = field(default_factory=dict)  # optimization -> its log lines, in order
    claims: Dict[str, str] = field(default_factory=dict)  # "path" or "path.attr" -> optimization
    switches: Dict[str, str] = field(default_factory=dict)  # optimization -> its opt.* key, for messages
    # (owner path from the root, attribute, whether the owner had it in its __dict__/_modules, original)
    changes: List[Tuple[str, str, bool, Any]] = field(default_factory=list)

    def claim(self, key: str, by: str) -> None:
        others = {owner for k, owner in self.claims.items() if owner != by and (k in (key, "*") or key == "*")}
        if others:
            other = sorted(others)[0]
            what = "the whole model" if "*" in (key, *[k for k, o in self.claims.items() if o == other]) else key
            raise PatchConflict(
                f"{by} and {other} both replace {what}; turn one of them off "
                f"(opt.{self.switches.get(by, by)}=false or opt.{self.switches.get(other, other)}=false)"
            )
        self.claims[key] = by


def state_of(root: nn.Module) -> Optional[PatchState]:
    return root.__dict__.get(STATE_ATTR)  # not getattr: PeftModel forwards unknown names to the base model


def patch_root(model: nn.Module) -> nn.Module:
    """The module whose patch state covers ``model``: itself, or the HF model inside it when that was
    patched before get_peft_model wrapped it (a later patch or unpatch of the wrapper goes there)."""
    if state_of(model) is None:
        hf = hf_model_of(model)
        if hf is not model and state_of(hf) is not None:
            return hf
    return model


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


def record(root: nn.Module, owner: nn.Module, attr: str, by: Optional[str], claim_key: Optional[str] = None) -> None:
    """Claim ``owner.attr`` for ``by`` (None: no claim) and remember its value, before the caller changes it."""
    state = state_of(root)
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
    record(root, parent, attr, by, claim_key=path)
    old = parent._modules[attr]
    new_module.train(old.training)
    setattr(parent, attr, new_module)
    return old


def override_attr(root: nn.Module, owner: nn.Module, attr: str, value: Any, by: str) -> None:
    """Set an instance attribute (a ``forward``, ``_loss_function``...) of ``owner``; undone by ``unpatch``."""
    record(root, owner, attr, by)
    setattr(owner, attr, value)


def add_forward_pre_hook(root: nn.Module, module: nn.Module, hook: Callable) -> None:
    """Register ``hook(module, args, kwargs)`` to run before every call of ``module``; undone by ``unpatch``.
    A hook sees every call, also when someone else installs their own ``forward`` over a patched one."""
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    state_of(root).changes.append(("", CALL_UNAPPLY, False, lambda _root: handle.remove()))


def note_once(root: nn.Module, name: str) -> Callable[[str], None]:
    """A ``note(message)`` for optimization ``name`` that, the first time it sees a message, logs it as a
    one-line warning and adds it to the model's ``optkit.patch_log`` (for what only a call can reveal)."""
    state, seen = state_of(root), set()

    def note(message: str) -> None:
        if message in seen:
            return
        seen.add(message)
        line = f"{name}: {message}"
        logger.warning("optkit: %s", line)
        if state is not None:
            state.logs.setdefault(name, []).append(line)

    return note


def undo(root: nn.Module, changes: List[Tuple[str, str, bool, Any]]) -> None:
    for path, attr, existed, original in reversed(changes):
        if attr == CALL_UNAPPLY:
            original(root)
            continue
        owner = root.get_submodule(path)
        if isinstance(original, nn.Module):
            current = owner._modules.get(attr)
            original.train(current.training if current is not None else owner.training)
            if current is not None:
                _keep_children_replaced_since(original, current)
        if existed:
            setattr(owner, attr, original)
        elif attr in owner.__dict__ or attr in owner._modules:
            delattr(owner, attr)


def _keep_children_replaced_since(original: nn.Module, current: nn.Module) -> None:
    """A replacement keeps the original's children (SwiGLUMLP its gate/up/down_proj); one that differs was
    replaced after patching (get_peft_model's LoRA wrappers) and stays when the original comes back."""
    for name, child in current.named_children():
        if name in original._modules and original._modules[name] is not child:
            original._modules[name] = child


def family_of_patched(model: nn.Module) -> str:
    """The family of the HF model inside ``model``; a clear error names the supported ones."""
    hf = hf_model_of(model)
    try:
        return family_of(hf)
    except UnknownModelError as exc:
        raise UnknownModelError(
            f"optkit.patch cannot patch {type(hf).__name__}: {exc}. Use opt=baseline (or only opt.compile) "
            "for other models"
        ) from None


def is_moe(hf: nn.Module) -> bool:
    config = getattr(hf, "config", None)
    return bool(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0))


# ---- module lookups and per-instance forwards whose globals see other functions ------------------------


def modules_of_class(model: nn.Module, class_name: str) -> List[Tuple[str, nn.Module]]:
    return [(path, m) for path, m in model.named_modules() if type(m).__name__ == class_name]


def _innermost(fn: Callable) -> Callable:
    while getattr(fn, "__wrapped__", None) is not None:
        fn = fn.__wrapped__
    return fn


def with_globals(fn: Callable, replacements: Dict[str, Any]) -> Callable:
    """A copy of ``fn`` that sees ``replacements`` as module globals; decorator wrappers (found through
    ``__wrapped__``) are copied too, each closing over the copy of the function it wraps."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        new_globals = {**fn.__globals__, **replacements}
        # Without __name__ torch.compile resolves these globals in this dict (it installs the dict by id);
        # with it, Dynamo would look them up in the real module and trace HF's function instead.
        new_globals.pop("__name__", None)
        new = types.FunctionType(fn.__code__, new_globals, fn.__name__, fn.__defaults__, fn.__closure__)
    else:
        new_inner = with_globals(inner, replacements)
        cells = fn.__closure__ or ()
        holds_inner = [_cell_value(c) is inner for c in cells]
        if not any(holds_inner):
            raise TypeError(
                f"cannot see through the decorator around {inner.__qualname__}; optkit's patch needs updating"
            )
        cells = tuple(types.CellType(new_inner) if hit else c for c, hit in zip(cells, holds_inner))
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__module__ = fn.__qualname__, fn.__module__
    if inner is not None:
        new.__wrapped__ = new_inner
    return new


def _cell_value(cell) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def rebind_attention_globals(model: nn.Module, replacements: Dict[str, Any], by: str) -> int:
    """Give every attention module of ``model`` a forward that sees ``replacements``; returns the count."""
    class_name = f"{get_family(family_of_patched(model)).class_prefix}Attention"
    copies: Dict[type, Callable] = {}  # one copy per class, shared by its layers
    found = modules_of_class(model, class_name)
    for _path, attention in found:
        cls = type(attention)
        if cls not in copies:
            names_used = _innermost(cls.forward).__code__.co_names
            unknown = [name for name in replacements if name not in names_used]
            if unknown:
                raise RuntimeError(
                    f"{cls.__name__}.forward no longer calls {', '.join(unknown)} in this "
                    "transformers version; optkit's rope patch needs updating"
                )
            copies[cls] = with_globals(cls.forward, replacements)
        override_attr(model, attention, "forward", types.MethodType(copies[cls], attention), by=by)
    return len(found)
