"""opt.moe_sorted_routing: MoE experts run by one sort + grouped GEMM instead of HF's per-expert loop.

Every HF 3-D experts module is swapped for train/moe.py's ``SortedExperts`` (sharing its parameters, router
untouched); the module doc there says how the routing is executed and why it needs no per-expert sync.
"""

from __future__ import annotations

from typing import List

from optkit.train.moe import SortedExperts, swap_experts


def apply_moe_sorted_routing(model, opt_cfg) -> List[str]:
    """opt.moe_sorted_routing: swap every HF 3D-experts module of ``model`` for ``SortedExperts``."""
    if not getattr(opt_cfg, "moe_sorted_routing", True):
        return []
    swapped = swap_experts(model)
    if not swapped:
        if any(isinstance(m, SortedExperts) for m in model.modules()):  # swapped already (e.g. by expert LoRA)
            return ["moe_sorted_routing: the experts already run SortedExperts; nothing changed"]
        return ["moe_sorted_routing: no MoE experts in this model; nothing changed"]
    first = swapped[0]
    return [
        f"moe_sorted_routing: {len(swapped)} experts modules ({first}, ...) -> SortedExperts "
        f"(argsort + offsets + grouped GEMM, router unchanged)"
    ]


def remove_moe_sorted_routing(model) -> None:
    """Put the original HF experts modules back (expert LoRA adapters and NF4 storage go with the swapped ones)."""
    originals = model.__dict__.pop("_optkit_moe_originals", {})
    for name, original in originals.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, original)
