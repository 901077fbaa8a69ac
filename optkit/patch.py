"""Switch optkit's optimizations (and its peers') into an HF model instance, chosen by config.

``model = optkit.patch(model, "full")`` works on a model from ``optkit.models.build_model``, on a
user's own ``AutoModelForCausalLM`` and on a peft ``PeftModel``. Everything is per instance: modules
are swapped (``RMSNorm.from_module`` shares the HF weight, so state-dict keys and optimizer state
carry over), forwards are replaced on the instance, and no HF class or module-level function is
edited, so two models in one process can differ. Every change is recorded with the exact object it
replaced, which is what ``unpatch`` puts back. Patching twice is patching once.

Two optimizations claiming the same module (or the same instance attribute) is an error; one that
does not apply to the model's family (geglu on Llama) is skipped with a log line, so ``opt=full``
works on every family.

RoPE: HF's attention modules call the module-level ``apply_rotary_pos_emb`` of their modeling
file. Instead of replacing that global (which would change every model of the family), each
attention module gets, as its instance ``forward``, a copy of its class's forward function whose
globals see optkit's rotary function. The copy runs HF's own code, so it follows whatever that
forward does in the installed transformers (5.17 and 5.24 differ in argument names, not in this).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from optkit.config import OptConfig


@dataclass(frozen=True)
class Optimization:
    name: str  # "rms_norm"
    config_key: str  # dotted path inside OptConfig: "kernels.rms_norm", "fused_lora", "compile", ...
    description: str  # one line, shown by `optkit list`
    requires: tuple  # subset of ("cuda", "triton", "bitsandbytes", "liger", "moe", "packing", "lora")
    families: Optional[tuple]  # families it applies to (None = all)
    apply: str  # "module:function", imported lazily: fn(model, opt_cfg) -> list[str]
    # "module:function" that undoes ``apply`` (fn(model)), for applies that change the model other than
    # through replace_module / override_attr (which unpatch reverts by itself); None: nothing to call
    unapply: Optional[str] = None


SILU_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
_KERNEL = ("triton",)
_ALL = (
    Optimization("rms_norm", "kernels.rms_norm", "RMSNorm modules (Qwen3 q/k norms too) -> optkit's Triton RMSNorm",
                 _KERNEL, None, "optkit.patch:apply_rms_norm"),
    Optimization("rope", "kernels.rope", "rotary embedding in every attention module -> optkit's Triton RoPE",
                 _KERNEL, None, "optkit.patch:apply_rope"),
    Optimization("swiglu", "kernels.swiglu", "SiLU-gated MLPs -> optkit's fused SwiGLU",
                 _KERNEL, SILU_FAMILIES, "optkit.patch:apply_swiglu"),
    Optimization("geglu", "kernels.geglu", "GELU-gated MLPs (Gemma) -> optkit's fused GeGLU",
                 _KERNEL, ("gemma2",), "optkit.patch:apply_geglu"),
    Optimization("cross_entropy", "kernels.cross_entropy", "loss on materialized logits -> optkit's Triton cross-entropy",
                 _KERNEL, None, "optkit.patch:apply_cross_entropy"),
    Optimization("fused_linear_cross_entropy", "kernels.fused_linear_cross_entropy",
                 "training loss from hidden states and lm_head, logits never materialized",
                 _KERNEL, None, "optkit.patch:apply_fused_linear_cross_entropy"),
    Optimization("fused_lora", "fused_lora", "LoRA MLP / QKV / O projections as fused autograd functions",
                 ("lora",), None, "optkit.train.fused_lora:apply_fused_lora"),
    Optimization("packed_metadata_cache", "packed_metadata_cache",
                 "packed-sequence boundary metadata built once per batch, not per layer",
                 ("packing",), None, "optkit.train.packing:apply_packed_metadata_cache",
                 "optkit.train.packing:remove_packed_attention"),
    Optimization("moe_sorted_routing", "moe_sorted_routing", "MoE routing by one sort + grouped GEMM, not per expert",
                 ("moe",), None, "optkit.train.moe:apply_moe_sorted_routing", "optkit.train.moe:remove_moe_sorted_routing"),
    Optimization("liger", "liger", "peer: Liger-Kernel's own patching (RoPE, RMSNorm, SwiGLU/GeGLU, fused linear CE)",
                 ("liger",), None, "optkit.patch:apply_liger"),
    Optimization("compile", "compile", "peer: torch.compile of the whole model (opt.compile_mode)",
                 (), None, "optkit.patch:apply_compile"),
)
REGISTRY: Dict[str, Optimization] = {o.name: o for o in _ALL}  # insertion order = application order

# Class-name prefix of each family's HF modules: <prefix>RMSNorm, <prefix>MLP, <prefix>Attention.
FAMILY_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
                       "qwen3_moe": "Qwen3Moe", "gemma2": "Gemma2"}
# Conditions on the model, not the machine: an optimization whose condition fails is skipped with a
# log line. ("packing" cannot be seen on the model: that apply function decides for itself.)
_MODEL_CONDITIONS = ("moe", "lora", "packing")
_STATE_ATTR = "_optkit_patch"
_CALL_UNAPPLY = "<unapply>"  # a change record that calls an optimization's unapply function


class MissingRequirement(RuntimeError):
    """An enabled optimization needs something this machine lacks; the runner records a skipped row."""


class PatchConflict(RuntimeError):
    """Two enabled optimizations replace the same module or attribute."""


# ---- config ------------------------------------------------------------------------------------

def load_opt_config(opt_cfg: Any) -> OptConfig:
    """An OptConfig from a preset name (conf/opt/<name>.yaml), an OptConfig, a DictConfig or a dict."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(opt_cfg, OptConfig):
        return opt_cfg
    if isinstance(opt_cfg, str):
        from optkit.compose import CONF_DIR, group_choices

        path = CONF_DIR / "opt" / f"{opt_cfg}.yaml"
        if not path.is_file():
            raise ValueError(f"opt preset {opt_cfg!r} unknown; choose one of: {', '.join(group_choices('opt'))}")
        opt_cfg = OmegaConf.load(path)
    if not isinstance(opt_cfg, (dict, DictConfig)):
        raise TypeError(f"opt_cfg must be a preset name, OptConfig, DictConfig or dict, not {type(opt_cfg).__name__}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptConfig), opt_cfg))
    except OmegaConfBaseException as exc:
        raise ValueError(f"bad opt config: {exc}") from exc


def _config_value(cfg: OptConfig, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def enabled_names(opt_cfg: Any) -> List[str]:
    """Registry names switched on in ``opt_cfg``, in application order."""
    cfg = load_opt_config(opt_cfg)
    return [name for name, opt in REGISTRY.items() if _config_value(cfg, opt.config_key)]


def _machine_problem(requirement: str, device: Optional[torch.device]) -> Optional[str]:
    if requirement == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if requirement == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if device is not None and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return f"optkit's Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU); device is {device}"
    if requirement == "bitsandbytes" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    if requirement == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    return None


def missing_requirements(opt_cfg: Any, model: Optional[nn.Module] = None, device=None) -> List[str]:
    """What this machine lacks for the enabled optimizations, one message per problem ([] when nothing)."""
    if device is None and model is not None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    device = torch.device(device) if device is not None else None
    names_by_problem: Dict[str, List[str]] = {}  # one message per problem, naming every optimization it stops
    for name in enabled_names(opt_cfg):
        for requirement in REGISTRY[name].requires:
            problem = None if requirement in _MODEL_CONDITIONS else _machine_problem(requirement, device)
            if problem:
                names_by_problem.setdefault(problem, []).append(name)
    return [f"{', '.join(names)}: {problem}" for problem, names in names_by_problem.items()]


# ---- patch state: claims and the record of every change ------------------------------------------

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


# ---- patch / unpatch -------------------------------------------------------------------------------

def _resolve(spec: str) -> Callable:
    module_name, _, fn_name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"{spec} could not be imported ({exc}); is optkit fully installed?") from exc


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


def _skip_reason(opt: Optimization, model: nn.Module, family: Optional[str]) -> Optional[str]:
    if opt.families is not None and family not in opt.families:
        return f"applies to {', '.join(opt.families)}, not {family}"
    if "moe" in opt.requires and not _is_moe(hf_model_of(model)):
        return "the model has no MoE layers"
    if "lora" in opt.requires and not any(hasattr(m, "lora_A") for m in model.modules()):
        return "the model has no LoRA adapters"
    return None


def _is_moe(hf: nn.Module) -> bool:
    config = getattr(hf, "config", None)
    return bool(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0))


def patch(model: nn.Module, opt_cfg: Any = "full") -> nn.Module:
    """Apply every optimization enabled in ``opt_cfg`` to ``model`` (in place) and return it."""
    cfg = load_opt_config(opt_cfg)
    names = enabled_names(cfg)
    state = _state_of(model)
    todo = [n for n in names if state is None or n not in state.logs]
    if not todo:
        return model
    missing = missing_requirements(cfg, model=model)
    if missing:
        raise MissingRequirement("; ".join(missing))
    needs_family = any(n not in ("compile", "liger") for n in todo)
    family = family_of_patched(model) if needs_family else None
    if state is None:
        state = _PatchState()
        model.__dict__[_STATE_ATTR] = state
    if "compile" in state.logs:
        raise PatchConflict(f"the model is already compiled; unpatch it first, then patch {', '.join(todo)} "
                            "and compile in one call (compile must come last)")
    n_changes, n_claims = len(state.changes), dict(state.claims)
    try:
        for name in todo:
            opt = REGISTRY[name]
            reason = _skip_reason(opt, model, family)
            if reason:
                lines = [f"skipped ({reason})"]
            else:
                if opt.unapply:  # recorded first, so a failing apply is cleaned up too
                    state.changes.append(("", _CALL_UNAPPLY, False, opt.unapply))
                lines = list(_resolve(opt.apply)(model, cfg))
            state.logs[name] = [line if line.startswith(f"{name}: ") else f"{name}: {line}" for line in lines]
    except BaseException:  # leave the model as it was before this call
        _undo(model, state.changes[n_changes:])
        del state.changes[n_changes:]
        state.claims = n_claims
        for name in todo:
            state.logs.pop(name, None)
        if not state.logs:
            del model.__dict__[_STATE_ATTR]
        raise
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put back every module and attribute ``patch`` changed (the very objects it replaced)."""
    state = _state_of(model)
    if state is not None:
        _undo(model, state.changes)
        del model.__dict__[_STATE_ATTR]
    return model


def patch_log(model: nn.Module) -> List[str]:
    """What ``patch`` did to ``model``, one line per change or skip, in application order."""
    state = _state_of(model)
    return [line for lines in state.logs.values() for line in lines] if state else []


# ---- module swaps ----------------------------------------------------------------------------------

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


# ---- losses -------------------------------------------------------------------------------------------

def shifted_targets(labels: torch.Tensor, ignore_index: int = -100, shift_labels=None) -> torch.Tensor:
    """HF ForCausalLMLoss's targets: labels padded with ignore_index and shifted left, flattened."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _normalize(loss_sum_or_mean: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is None:
        return loss_sum_or_mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum_or_mean.device)
    return loss_sum_or_mean / num_items_in_batch


def _causal_lm_loss(cross_entropy: Callable) -> Callable:
    """HF's ForCausalLMLoss (same arguments, same mean over non-ignored tokens) on optkit's kernel."""

    def loss_function(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **kwargs):
        targets = shifted_targets(labels, ignore_index, shift_labels).to(logits.device)
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = cross_entropy(logits.reshape(-1, vocab_size), targets, ignore_index=ignore_index, reduction=reduction)
        return _normalize(loss.float(), num_items_in_batch)

    return loss_function


def apply_cross_entropy(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    from optkit.kernels.cross_entropy import cross_entropy

    hf = hf_model_of(model)
    if not hasattr(type(hf), "loss_function"):
        return [f"cross_entropy: skipped ({type(hf).__name__} has no loss_function to replace)"]
    # HF's loss_function property returns the instance's _loss_function when set (5.17 and 5.24).
    override_attr(model, hf, "_loss_function", _causal_lm_loss(cross_entropy), by="cross_entropy")
    return ["cross_entropy: loss_function -> optkit cross_entropy on materialized logits"]


def _fused_loss_forward(self, *args, labels=None, return_logits=None, **kwargs):
    """The CausalLM forward with the training loss fused into the LM head (instance method).

    With labels (and ``return_logits`` not True; None means "only in eval mode"), the loss comes from
    ``fused_linear_cross_entropy`` on the final hidden states and logits is None; otherwise it is
    HF's own forward, unchanged.
    """
    if len(args) == 1:  # model(input_ids, labels=...)
        kwargs["input_ids"], args = args[0], ()
    wants_logits = (not self.training) if return_logits is None else return_logits
    if labels is None or wants_logits or args or kwargs.get("logits_to_keep", 0) not in (0, None):
        before = self.__dict__.get("_optkit_forward_before_fused_loss")
        if before is not None:
            return before(*args, labels=labels, **kwargs)
        return type(self).forward(self, *args, labels=labels, **kwargs)
    from optkit.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    output_router_logits = kwargs.pop("output_router_logits", None)
    if _is_moe(self) and output_router_logits is None:
        output_router_logits = getattr(self.config, "output_router_logits", False)
    return_dict = kwargs.pop("return_dict", None)
    body_kwargs = {k: v for k, v in kwargs.items() if k != "logits_to_keep"}
    if output_router_logits:
        body_kwargs["output_router_logits"] = True
    outputs = getattr(self, self.base_model_prefix)(**body_kwargs)  # HF passes its kwargs to the body too

    hidden = outputs.last_hidden_state
    ignore_index = kwargs.get("ignore_index", -100)
    targets = shifted_targets(labels, ignore_index, kwargs.get("shift_labels")).to(hidden.device)
    num_items = kwargs.get("num_items_in_batch")
    loss = fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets, bias=self.lm_head.bias,
        ignore_index=ignore_index, reduction="sum" if num_items is not None else "mean",
        softcap=getattr(self.config, "final_logit_softcapping", None),
    )
    loss = _normalize(loss.float(), num_items)
    return _causal_lm_output(self, outputs, loss, output_router_logits, kwargs.get("attention_mask"), return_dict)


def _causal_lm_output(hf, outputs, loss, output_router_logits, attention_mask, return_dict):
    from transformers import modeling_outputs

    moe = _is_moe(hf)
    fields = {"loss": loss, "logits": None}
    if moe and output_router_logits:  # HF's MoE auxiliary load-balancing loss, as its own forward adds it
        balancing_loss = sys.modules[type(hf).__module__].load_balancing_loss_func
        aux = balancing_loss(outputs.router_logits, hf.num_experts, hf.num_experts_per_tok, attention_mask)
        fields["aux_loss"] = aux
        fields["loss"] = loss + hf.router_aux_loss_coef * aux.to(loss.device)
    output_cls = modeling_outputs.MoeCausalLMOutputWithPast if moe else modeling_outputs.CausalLMOutputWithPast
    for name in output_cls.__dataclass_fields__:  # cache / past_key_values, hidden_states, ... (version-safe)
        if name not in fields and name in outputs.__dataclass_fields__:
            fields[name] = getattr(outputs, name)
    result = output_cls(**fields)
    return result.to_tuple() if return_dict is False else result


def apply_fused_linear_cross_entropy(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    importlib.import_module("optkit.kernels.fused_linear_cross_entropy")  # fail now, not at the first step
    hf = hf_model_of(model)
    lm_head = getattr(hf, "lm_head", None)
    if type(lm_head) is not nn.Linear:  # peft-wrapped or quantized heads have no plain weight to fuse
        kind = type(lm_head).__name__ if lm_head is not None else "no lm_head"
        return [f"fused_linear_cross_entropy: skipped (lm_head is {kind}, not a plain nn.Linear)"]
    previous = hf.__dict__.get("forward")
    if previous is not None:  # someone (accelerate hooks, another tool) replaced it on the instance first
        override_attr(model, hf, "_optkit_forward_before_fused_loss", previous, by="fused_linear_cross_entropy")
    override_attr(model, hf, "forward", types.MethodType(_fused_loss_forward, hf), by="fused_linear_cross_entropy")
    softcap = getattr(hf.config, "final_logit_softcapping", None)
    return [f"fused_linear_cross_entropy: {type(hf).__name__}.forward fuses lm_head + loss when labels are given"
            + (f" (final_logit_softcapping={softcap})" if softcap else "")]


# ---- peers ----------------------------------------------------------------------------------------------

def apply_compile(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    kwargs = {"mode": opt_cfg.compile_mode} if opt_cfg.compile_mode else {}
    _record(model, model, "_compiled_call_impl", by=None)  # composes with every other patch: no claim
    model.compile(**kwargs)
    return [f"compile: compiled (torch.compile of {type(model).__name__}, mode={opt_cfg.compile_mode or 'default'})"]


def _module_snapshot(root: nn.Module) -> Dict[str, Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]]:
    return {path: (m, dict(m.__dict__), dict(m._modules)) for path, m in root.named_modules(remove_duplicate=False)}


def apply_liger(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    """Liger-Kernel's per-instance API, made per-instance for real.

    liger's ``apply_liger_kernel_to_<family>(model=...)`` binds new forwards on the instance's modules
    but also replaces module-level names of the HF modeling file (``apply_rotary_pos_emb``, the norm and
    MLP classes), which would change every model of the family in the process. Those globals are put
    back at once, and the attention modules of this model get instance forwards that see liger's rotary
    function instead; every instance change liger made is recorded so ``unpatch`` reverts it.
    """
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    hf = hf_model_of(model)
    _state_of(model).claim("*", "liger")  # liger replaces norms, MLPs, rope and the loss: nothing else may
    modeling = sys.modules[type(hf).__module__]
    globals_before = dict(vars(modeling))
    before = _module_snapshot(model)
    _apply_liger_kernel_to_instance(model=hf, rope=True, rms_norm=True, swiglu=True, geglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=True)
    changed_globals = {k: v for k, v in vars(modeling).items() if globals_before.get(k) is not v}
    for name in changed_globals:
        if name in globals_before:
            setattr(modeling, name, globals_before[name])
        else:
            delattr(modeling, name)
    state = _state_of(model)
    n_modules = 0
    for path, (module, dict_before, modules_before) in before.items():
        touched = False
        for attr, value in list(module.__dict__.items()):
            if attr not in dict_before or dict_before[attr] is not value:
                state.changes.append((path, attr, attr in dict_before, dict_before.get(attr)))
                touched = True
        for attr, child in module._modules.items():
            if modules_before.get(attr) is not child:
                state.changes.append((path, attr, attr in modules_before, modules_before.get(attr)))
                touched = True
        n_modules += touched
    log = [f"liger: liger-kernel patched {n_modules} modules of this {type(hf).__name__}"]
    if "apply_rotary_pos_emb" in changed_globals:
        count = rebind_attention_globals(
            model, {"apply_rotary_pos_emb": changed_globals["apply_rotary_pos_emb"]}, by="liger")
        log.append(f"liger: {count} attention modules call liger's rotary (instance forwards, HF globals restored)")
    return log


class _CallablePatchModule(types.ModuleType):
    """``optkit.patch(model, "full")`` is the documented one-liner, and ``optkit.patch`` is also this
    module: making the module callable keeps both true (importing the submodule would otherwise
    replace a function of that name on the package)."""

    def __call__(self, model, opt_cfg="full"):
        return patch(model, opt_cfg)


sys.modules[__name__].__class__ = _CallablePatchModule
