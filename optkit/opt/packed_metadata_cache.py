"""opt.packed_metadata_cache: packed rows' boundary metadata built once per batch, not in every layer.

A forward pre-hook on the decoder stack builds the metadata once per forward from position_ids (one
device->host copy, the one sync; cu_seqlens copied back asynchronously from pinned memory) and hands it to
every layer as a keyword argument, which HF threads through the decoder layers into the attention function
untouched, so no layer syncs. The packed attention itself and the per-layer baseline are train/packing.py's.
"""

from __future__ import annotations

from typing import List

from optkit.train.packing import (
    METADATA_KWARG,
    build_packed_metadata,
    decoder_stack,
    install_packed_attention,
    packing_state,
    remove_packed_attention,
)


def apply_packed_metadata_cache(model, opt_cfg) -> List[str]:
    """opt.packed_metadata_cache: packed attention whose metadata is built once per batch and shared by all layers."""
    if not getattr(opt_cfg, "packed_metadata_cache", True):
        return []
    log = install_packed_attention(model)
    state = packing_state(model)
    if "cache_hook" not in state:
        base = decoder_stack(model)
        state["cache_hook"] = base.register_forward_pre_hook(_attach_metadata, with_kwargs=True)
        log.append(
            f"packing: {type(base).__name__} builds packed metadata once per forward; its "
            f"{len(base.layers)} layers reuse it (no per-layer host sync)"
        )
    return log


def remove_packed_metadata_cache(model) -> None:
    """Undo ``apply_packed_metadata_cache``: the cache's hook and the packed attention it installed go."""
    remove_packed_attention(model)


def _attach_metadata(module, args, kwargs):
    position_ids = kwargs.get("position_ids")
    if position_ids is None or kwargs.get("attention_mask") is not None or kwargs.get(METADATA_KWARG) is not None:
        return None  # not a packed batch: HF's own attention runs (see _route_batch)
    rows = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    kwargs[METADATA_KWARG] = build_packed_metadata(position_ids.expand(rows.shape[0], -1))
    module._optkit_packing_state["stats"].per_batch_builds += 1
    return args, kwargs
