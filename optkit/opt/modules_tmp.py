"""Module swaps: optkit's RMSNorm, fused SwiGLU / GeGLU MLPs and Triton RoPE into an HF model instance.

RoPE: HF's attention modules call the module-level ``apply_rotary_pos_emb`` of their modeling
file. Instead of replacing that global (which would change every model of the family), each
attention module gets, as its instance ``forward``, a copy of its class's forward function whose
globals see optkit's rotary function. The copy runs HF's own code, so it follows whatever that
forward does in the installed transformers (5.17 and 5.24 differ in argument names, not in this).
"""
from __future__ import annotations

import types
from typing import Any, Callable, Dict, List, Tuple

from torch import nn

from optkit.config import OptConfig
from optkit.patch_registry import FAMILY_CLASS_PREFIX
from optkit.patch_state import _is_moe, family_of_patched, hf_model_of, override_attr, replace_module


def _modules_of_class(model: nn.Module, class_name: str) -> List[Tuple[str, nn.Module]]:
    return [(path, m) for path, m in model.named_modules() if type(m).__name__ == class_name]


def apply_rms_norm(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    from optkit.kernels.rms_norm import RMSNorm

    family = family_of_patched(model)
    class_name = f"{FAMILY_CLASS_PREFIX[family]}RMSNorm"
    cast_mode = "gemma" if family == "gemma2" else "llama"  # Gemma2 rounds once, after (1 + weight)
    found = _modules_of_class(model, class_name)
    for path, norm in found:
        replace_module(model, path, RMSNorm.from_module(norm, cast_mode=cast_mode), by="rms_norm")
    return [f"rms_norm: {len(found)} x {class_name} -> optkit RMSNorm (cast_mode={cast_mode})"]


def _swap_gated_mlps(model: nn.Module, by: str, accepts: Callable[[str], bool], make: Callable) -> List[str]:
    from optkit.kernels._launch import hf_activation_name

    family = family_of_patched(model)
    class_name = f"{FAMILY_CLASS_PREFIX[family]}MLP"
    swapped, other = 0, []
    for path, mlp in _modules_of_class(model, class_name):
        activation = hf_activation_name(mlp)
        if not accepts(activation):
            other.append(f"{path} ({activation})")
            continue
        replace_module(model, path, make(mlp), by=by)
        swapped += 1
    log = [f"{by}: {swapped} x {class_name} -> optkit {by} MLP"]
    if other:
        log.append(f"{by}: left {len(other)} MLPs with another activation: {', '.join(other)}")
    if swapped == 0 and _is_moe(hf_model_of(model)):
        log.append(f"{by}: the MoE experts keep HF's activation (3-D expert weights; see moe_sorted_routing)")
    return log


def apply_swiglu(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    from optkit.kernels.swiglu import SILU_ACTIVATIONS, SwiGLUMLP

    return _swap_gated_mlps(model, "swiglu", lambda act: act in SILU_ACTIVATIONS, SwiGLUMLP.from_module)


def apply_geglu(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    from optkit.kernels.geglu import HF_GELU_FORMS, GeGLUMLP

    return _swap_gated_mlps(model, "geglu", lambda act: act in HF_GELU_FORMS, GeGLUMLP.from_module)


# ---- RoPE: per-instance forwards whose globals see another rotary function ---------------------------

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
            raise TypeError(f"cannot see through the decorator around {inner.__qualname__}; optkit's patch needs updating")
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
    family = family_of_patched(model)
    class_name = f"{FAMILY_CLASS_PREFIX[family]}Attention"
    copies: Dict[type, Callable] = {}  # one copy per class, shared by its layers
    found = _modules_of_class(model, class_name)
    for _path, attention in found:
        cls = type(attention)
        if cls not in copies:
            names_used = _innermost(cls.forward).__code__.co_names
            unknown = [name for name in replacements if name not in names_used]
            if unknown:
                raise RuntimeError(f"{cls.__name__}.forward no longer calls {', '.join(unknown)} in this "
                                   "transformers version; optkit's rope patch needs updating")
            copies[cls] = with_globals(cls.forward, replacements)
        override_attr(model, attention, "forward", types.MethodType(copies[cls], attention), by=by)
    return len(found)


def _rotary_adapter(apply_rotary: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        if unsqueeze_dim != 1:
            raise ValueError(f"optkit rope expects HF's (B, H, S, D) layout (unsqueeze_dim=1), got {unsqueeze_dim}")
        return apply_rotary(q, k, cos, sin)

    return apply_rotary_pos_emb


def apply_rope(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    from optkit.kernels.rope import apply_rotary

    count = rebind_attention_globals(model, {"apply_rotary_pos_emb": _rotary_adapter(apply_rotary)}, by="rope")
    return [f"rope: {count} attention modules call optkit apply_rotary (instance forwards)"]
