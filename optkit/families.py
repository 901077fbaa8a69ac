"""One row per model family: the HF classes, the gated MLP's activation, how RMSNorm rounds, MoE-ness,
what the decoder layer does with its MLP's output.

Every other module asks this table; no family name is spelled anywhere else. Classes are named, not
imported, so a family missing from the installed transformers is a clear error when it is used.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, Tuple


@dataclass(frozen=True)
class Family:
    name: str  # what conf/model/*.yaml says in `family:`
    config_class: str  # transformers config class
    model_class: str  # transformers causal-LM class
    class_prefix: str  # HF module classes are <prefix>RMSNorm, <prefix>MLP, <prefix>Attention
    activation: str  # the gated MLP's activation: "silu" (SwiGLU) | "gelu" (GeGLU)
    # "llama": normalize in fp32, cast, then multiply by the weight; "gemma": (1 + weight) in fp32, one cast after
    norm_rounding: str
    moe: bool  # decoder MLPs are routed experts
    # The HF decoder layer (<prefix>DecoderLayer) adds its MLP's output to the residual and reads it nowhere
    # else, so a checkpoint recompute, whose output is discarded, need not compute it. Read in the HF
    # source of each family; Gemma 2 normalizes the MLP output first (post_feedforward_layernorm saves it).
    mlp_output_only_in_residual: bool = False


FAMILIES: Dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", "LlamaConfig", "LlamaForCausalLM", "Llama", "silu", "llama", False, True),
        Family("mistral", "MistralConfig", "MistralForCausalLM", "Mistral", "silu", "llama", False, True),
        Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "Qwen2", "silu", "llama", False, True),
        Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "Qwen3", "silu", "llama", False, True),
        Family("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Qwen3Moe", "silu", "llama", True, True),
        Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "Gemma2", "gelu", "gemma", False),
    )
}


class UnknownModelError(ValueError):
    """A family or model_type optkit has no row for; the message lists the supported ones."""


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UnknownModelError(f"model family {name!r} unknown; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def families_with(**facts: Any) -> Tuple[str, ...]:
    """Names of the families whose fields equal ``facts``, e.g. ``families_with(activation="silu")``."""
    return tuple(f.name for f in FAMILIES.values() if all(getattr(f, k) == v for k, v in facts.items()))


def family_classes(name: str):
    """(config class, causal-LM class) of a family in the installed transformers."""
    import transformers

    family = get_family(name)
    try:
        return getattr(transformers, family.config_class), getattr(transformers, family.model_class)
    except AttributeError:
        raise UnknownModelError(
            f"transformers {transformers.__version__} has no {family.model_class}; upgrade transformers to use {name!r}"
        ) from None


def decoder_layer_class(name: str) -> type:
    """The family's HF decoder-layer class, from the modeling module of its causal-LM class."""
    _, model_class = family_classes(name)
    found = getattr(sys.modules[model_class.__module__], f"{get_family(name).class_prefix}DecoderLayer", None)
    if found is None:
        raise UnknownModelError(f"{model_class.__module__} has no {get_family(name).class_prefix}DecoderLayer")
    return found


def family_of(model: Any) -> str:
    """The family of an HF model instance, from its config's model_type (which equals the family name)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnknownModelError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return model_type
