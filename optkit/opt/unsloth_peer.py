"""Unsloth as a measured peer: the model built and adapted by Unsloth's own calls, as its users write them,

    model, tokenizer = FastLanguageModel.from_pretrained(<checkpoint dir>, max_seq_length=S, dtype=bf16,
                                                         load_in_4bit=<qlora>, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=..., lora_alpha=..., lora_dropout=0, bias="none",
                                             target_modules=[...], use_gradient_checkpointing=..., random_state=seed)

then trained by optkit's own plain loop (``model(...).loss``, ``backward``, optimizer step): Unsloth patches
the HF classes when it is imported, so a plain loop gets its kernels.

What this relies on (facts from ../shared/PEERS.md; no Unsloth code is used or copied here):
- ``import unsloth`` comes before transformers and peft, so the point runs in a process of its own whose
  entry is optkit/bench/unsloth_point.py (the runner picks it and sets the offline variables and the one
  allocator config every point of a sweep gets, which Unsloth would otherwise set for itself).
- The directory it loads needs config.json, weights and a tokenizer: bench/checkpoint_cache.py writes
  optkit's random weights there (the weights every other opt-set of the point trains from).
- ``train.checkpointing`` maps onto ``use_gradient_checkpointing``: standard -> True, offload -> "unsloth"
  (its CPU offload of layer inputs, plain True below 512 tokens), none -> False.
- ``load_in_4bit`` is NF4 with double quantization and compute dtype = dtype, as optkit's QLoRA.
- Its fused LoRA needs lora_dropout == 0 and bias "none"; it prints how many QKV / O / MLP layers it
  patched (or what it cannot patch): that output is captured and parsed into the row.
- Its loss computes the LM head's gradient inside forward, so its rows keep whole-step times only.
"""

from __future__ import annotations

import inspect
import io
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Collection, Dict, Iterator, List, Optional, Tuple

from torch import nn

from optkit.config.schema import OptConfig
from optkit.models import torch_dtype

INSTALL = "pip install unsloth unsloth_zoo, on a GPU machine; offline wheels: ../shared/tools/gpu-wheels.sh"
GRADIENT_CHECKPOINTING = {"none": False, "standard": True, "offload": "unsloth"}  # train.checkpointing -> its value
OFFLOAD_MIN_TOKENS = 512  # below this its "unsloth" checkpointing is plain True
# What this process's one Unsloth build reported; unsloth_point.py copies it into the point's rows.
BUILD: Dict[str, Any] = {}
_BUILT_BY_UNSLOTH = "_optkit_built_by_unsloth"
_PATCHED = {
    key: re.compile(rf"(\d+)\s+{label}\s+layers\b") for key, label in (("qkv", "QKV"), ("o", "O"), ("mlp", "MLP"))
}


class UnsupportedPoint(RuntimeError):
    """A point Unsloth's path cannot run as configured; the message names the setting to change."""


def unsupported_reason(cfg) -> Optional[str]:
    """Why ``cfg`` (an OptkitConfig) is not a point Unsloth's path runs, or None."""
    train = cfg.train
    if train.method not in ("lora", "qlora"):
        return f"opt=unsloth measures LoRA and QLoRA; train.method={train.method}: set lora or qlora"
    if train.checkpointing not in GRADIENT_CHECKPOINTING:
        modes = ", ".join(GRADIENT_CHECKPOINTING)
        return f"Unsloth has no train.checkpointing={train.checkpointing} mode; choose one of: {modes}"
    if train.method == "qlora" and (train.qlora_quant_type != "nf4" or not train.qlora_double_quant):
        return (
            "Unsloth's load_in_4bit is NF4 with double quantization: set qlora_quant_type=nf4, qlora_double_quant=true"
        )
    if "experts" in train.lora_targets:
        return "opt=unsloth takes peft target module names; drop 'experts' from train.lora_targets"
    if cfg.data.packing:
        return "opt=unsloth runs padded batches here; set data.packing=false"
    if getattr(train, "distributed", "none") != "none":
        return "opt=unsloth runs on one GPU; set train.distributed=none"
    return None


def from_pretrained_kwargs(cfg, checkpoint_dir: Path, accepted: Collection[str]) -> Dict[str, Any]:
    """FastLanguageModel.from_pretrained's arguments; ``accepted``: the parameter names it has."""
    kwargs: Dict[str, Any] = {
        "model_name": str(Path(checkpoint_dir).resolve()),  # absolute: a name with one "/" may go to the hub
        "max_seq_length": cfg.data.seq_len,
        "dtype": torch_dtype(cfg.model.dtype),
        "load_in_4bit": cfg.train.method == "qlora",
        "local_files_only": True,
    }
    if "offload_embedding" in accepted:  # "auto" may move the embedding to host RAM when memory looks low
        kwargs["offload_embedding"] = False
    return kwargs


def peft_kwargs(cfg) -> Dict[str, Any]:
    """FastLanguageModel.get_peft_model's arguments, from the same train.* settings peft gets elsewhere."""
    train = cfg.train
    return {
        "r": train.lora_r,
        "lora_alpha": train.lora_alpha,
        "lora_dropout": train.lora_dropout,
        "bias": "none",
        "target_modules": list(train.lora_targets),
        "use_gradient_checkpointing": GRADIENT_CHECKPOINTING[train.checkpointing],
        "random_state": train.seed,
    }


def patched_layers(text: str) -> Optional[Dict[str, int]]:
    """{qkv, o, mlp}: the layer counts in Unsloth's "... N QKV layers, N O layers and N MLP layers" line
    (the last such line); None when it printed none."""
    counts = {}
    for key, pattern in _PATCHED.items():
        found = pattern.findall(text)
        if found:
            counts[key] = int(found[-1])
    return counts or None


def notable_lines(text: str) -> List[str]:
    """Unsloth's lines about what it patched or could not patch (they go into the row's patch log)."""
    keep = ("patched", "cannot patch", "Unsloth:")
    return [line.strip() for line in text.splitlines() if any(k in line for k in keep)][-20:]


@contextmanager
def captured_output() -> Iterator[List[str]]:
    """Everything this process writes to stdout and stderr inside the block (Python, logging handlers that
    hold the old streams, native code: file descriptors 1 and 2 are redirected), as one string appended to
    the yielded list on exit; it is echoed to stderr then, so the point's log still shows it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    old_streams = (sys.stdout, sys.stderr)
    captured: List[str] = []
    with tempfile.TemporaryFile() as sink:
        text = io.TextIOWrapper(open(sink.fileno(), "wb", closefd=False), line_buffering=True)
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        sys.stdout = sys.stderr = text
        try:
            yield captured
        finally:
            text.flush()
            sys.stdout, sys.stderr = old_streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))
            sys.stderr.write(captured[0])
            sys.stderr.flush()


def build_unsloth_model(cfg, checkpoint_dir: Path) -> Tuple[nn.Module, Dict[str, Any]]:
    """(model, checkpointing info) from Unsloth's own calls on ``checkpoint_dir``; what it reported goes to
    BUILD. Raises UnsupportedPoint for a point its path cannot run."""
    reason = unsupported_reason(cfg)
    if reason:
        raise UnsupportedPoint(reason)
    from unsloth import FastLanguageModel

    accepted = inspect.signature(FastLanguageModel.from_pretrained).parameters
    started = time.perf_counter()
    with captured_output() as output:
        model, _tokenizer = FastLanguageModel.from_pretrained(**from_pretrained_kwargs(cfg, checkpoint_dir, accepted))
        model = FastLanguageModel.get_peft_model(model, **peft_kwargs(cfg))
    text = output[0] if output else ""
    BUILD.clear()
    BUILD.update(
        unsloth_patched_layers=patched_layers(text),
        unsloth_load_s=round(time.perf_counter() - started, 3),
        log=notable_lines(text),
    )
    model.__dict__[_BUILT_BY_UNSLOTH] = True
    mode = GRADIENT_CHECKPOINTING[cfg.train.checkpointing]
    info: Dict[str, Any] = {"checkpointing": cfg.train.checkpointing, "unsloth_use_gradient_checkpointing": mode}
    if mode == "unsloth" and cfg.data.seq_len < OFFLOAD_MIN_TOKENS:
        info["note"] = f"Unsloth runs plain True checkpointing below {OFFLOAD_MIN_TOKENS} tokens"
    return model, info


def apply_unsloth(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    """The registry's apply: Unsloth already built ``model`` (bench/setup.py); this names what it did."""
    if not model.__dict__.get(_BUILT_BY_UNSLOTH):
        raise ValueError(
            "opt.unsloth builds the model itself (FastLanguageModel.from_pretrained + get_peft_model) and cannot "
            "patch a model optkit built: run it through `optkit bench opt=unsloth`"
        )
    counts = BUILD.get("unsloth_patched_layers")
    said = ", ".join(f"{n} {k.upper()}" for k, n in counts.items()) if counts else "no layer count printed"
    return [f"unsloth: built by FastLanguageModel.from_pretrained + get_peft_model; patched layers: {said}"] + [
        f"unsloth: {line}" for line in BUILD.get("log", [])
    ]
