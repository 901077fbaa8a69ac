"""Gradient checkpointing modes (train.checkpointing)."""
from __future__ import annotations

from typing import Any, Dict


def enable_checkpointing(model, mode: str) -> Dict[str, Any]:
    """Switch the decoder layers of ``model`` (HF or peft-wrapped) to ``mode``; returns info for the row."""
    if mode == "none":
        return {"checkpointing": "none"}
    if mode == "standard":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        return {"checkpointing": "standard"}
    raise NotImplementedError(f"train.checkpointing={mode!r} is not implemented yet")
