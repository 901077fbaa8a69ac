"""Peers, patched through optkit so they are measured (and undone) like optkit's own optimizations:
torch.compile, and Liger-Kernel's patching made truly per instance. (Unsloth builds its own model:
opt/unsloth_peer.py.)

torch.compile comes in two scopes (opt.compile_scope):
- ``layers`` (presets compile, full_compile): every decoder layer compiled on its own, as torchtitan does,
  through the modules the layer calls (attention, MLP, norms: each ``.compile()``d, one compilation shared
  by all layers). The model's forward stays eager, so HF builds no attention mask for an unpadded batch
  and every layer calls SDPA with ``is_causal=True``, no mask and grouped K/V (flash-eligible on a GPU).
  Why the layer's children and not the layer: a compiled layer would have to trace HF's checkpoint
  wrapper, and dynamo gives up on the whole frame there (a side effect inside the checkpoint), leaving the
  layer eager; the children are called inside the checkpoint (every train.checkpointing mode), so they
  run compiled in forward and in the recompute alike.
- ``model`` (preset compile_model; what HF Trainer's ``torch_compile=True`` does): the whole model. Under
  tracing HF cannot prove the batch unpadded, so it materializes a boolean causal mask and repeats K/V:
  SDPA gets ``attn_mask`` and ``is_causal=False`` (no flash backend), and dynamo breaks the graph at
  ``torch.utils.checkpoint``, so checkpointed layers only get their inner frames compiled.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Tuple

from torch import nn

from optkit.config.schema import OptConfig
from optkit.opt.edits import hf_model_of, rebind_attention_globals, record, state_of
from optkit.train.method import decoder_layers


def compile_kwargs(opt_cfg: OptConfig) -> Dict[str, Any]:
    """The keyword arguments of every torch.compile call (tests swap in a graph-capturing backend here)."""
    return {"mode": opt_cfg.compile_mode} if opt_cfg.compile_mode else {}


def apply_compile(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    kwargs = compile_kwargs(opt_cfg)
    mode = opt_cfg.compile_mode or "default"
    if opt_cfg.compile_scope == "layers":
        layers = decoder_layers(model)
        names = sorted({name for layer in layers for name, _ in layer.named_children()})
        for layer in layers:
            for child in layer.children():  # composes with every other patch: no claim
                record(model, child, "_compiled_call_impl", by=None)
                child.compile(**kwargs)
        return [
            f"compile: compiled {len(layers)} decoder layers through their {', '.join(names)} (torch.compile per "
            f"module, mode={mode}); the model's forward and HF's checkpointing stay eager"
        ]
    record(model, model, "_compiled_call_impl", by=None)
    model.compile(**kwargs)
    return [f"compile: compiled the whole model (torch.compile of {type(model).__name__}, mode={mode})"]


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
    state_of(model).claim("*", "liger")  # liger replaces norms, MLPs, rope and the loss: nothing else may
    modeling = sys.modules[type(hf).__module__]
    globals_before = dict(vars(modeling))
    before = _module_snapshot(model)
    _apply_liger_kernel_to_instance(
        model=hf,
        rope=True,
        rms_norm=True,
        swiglu=True,
        geglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=True,
    )
    changed_globals = {k: v for k, v in vars(modeling).items() if globals_before.get(k) is not v}
    for name in changed_globals:
        if name in globals_before:
            setattr(modeling, name, globals_before[name])
        else:
            delattr(modeling, name)
    state = state_of(model)
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
            model, {"apply_rotary_pos_emb": changed_globals["apply_rotary_pos_emb"]}, by="liger"
        )
        log.append(f"liger: {count} attention modules call liger's rotary (instance forwards, HF globals restored)")
    return log
