"""opt.kernels.rope: every attention module of the model applies RoPE with optkit's Triton kernel.

HF's attention modules call the module-level ``apply_rotary_pos_emb`` of their modeling file. Instead of
replacing that global (which would change every model of the family), each attention module gets, as its
instance ``forward``, a copy of its class's forward whose globals see optkit's rotary function
(``edits.rebind_attention_globals``). The copy runs HF's own code, so it follows whatever that forward
does in the installed transformers. RoPE runs in place there (optkit/kernels/rope.py: no q_rot / k_rot
allocation), since nothing in that forward reads q or k again before they are rotated.
"""

from __future__ import annotations

from typing import Callable, List

from torch import nn

from optkit.config.schema import OptConfig
from optkit.opt.edits import rebind_attention_globals


def _rotary_adapter(apply_rotary: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        if unsqueeze_dim != 1:
            raise ValueError(f"optkit rope expects HF's (B, H, S, D) layout (unsqueeze_dim=1), got {unsqueeze_dim}")
        # In place: HF's attention forward never reads the unrotated q / k again (autograd's version check
        # would fail loudly if a module before it had saved them).
        return apply_rotary(q, k, cos, sin, True)

    return apply_rotary_pos_emb


def apply_rope(model: nn.Module, opt_cfg: OptConfig) -> List[str]:
    from optkit.kernels.rope import apply_rotary

    count = rebind_attention_globals(model, {"apply_rotary_pos_emb": _rotary_adapter(apply_rotary)}, by="rope")
    return [f"rope: {count} attention modules call optkit apply_rotary (instance forwards)"]
