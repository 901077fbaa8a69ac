"""Packed (padding-free) attention for HF models, and the per-batch boundary-metadata cache.

Packed rows hold several examples back to back (optkit.data.packing); position_ids restart at 0 at each example, and
attention must stay inside each example. The kernel is PyTorch's own: ``torch.nn.attention.varlen.varlen_attn`` (the
flash-attention varlen kernel shipped in torch >= 2.10; CUDA, fp16/bf16) takes the boundaries as ``cu_seqlens`` (a
device tensor) plus ``max_seqlen`` (a host int). Where it cannot run (CPU, fp32, older torch) a loop of causal SDPA
calls, one per example, computes exactly the same thing from the boundaries as host ints.

Baseline, ``install_packed_attention`` (HF rebuilding the metadata in every layer):
HF's flash-attention path given only position_ids (transformers 5.17 and 5.24,
``modeling_flash_attention_utils._flash_attention_forward``, padding-free branch) re-derives the boundaries inside
EVERY attention layer with these HF functions, which we call as they are:
  1. ``_is_packed_sequence(position_ids, 1)`` tested in an ``if``        -> 1 device->host sync
  2. ``prepare_fa_kwargs_from_position_ids``: ``(pos == min).nonzero()``  -> 1 sync (nonzero sizes its output on host)
     and ``torch.tensor(position_ids.size(), device=...)``              -> a blocking host->device copy
  3. its 0-d ``max_length`` turned into the int the kernel takes          -> 1 sync (flash kernels take an int)
= 3 device->host syncs per layer per forward, 4 blocking calls as torch's sync debug mode counts them on GPU (the
claim says ~4 per layer); on CPU the loop kernel reads the boundaries to the host as well. flash-attn is not
installed here, so the baseline runs this exact metadata work with torch's varlen kernel instead of flash_attn's.
(HF's sdpa path builds one dense (B, 1, T, T) mask per forward instead: another kernel, not this comparison.)
HF needs packed inputs as one (1, total) row; we flatten (B, T) rows to that, which is what HF's collator produces.

Cache (``opt.packed_metadata_cache``, optkit/opt/packed_metadata_cache.py): a forward pre-hook on the decoder stack
builds the metadata once per forward from position_ids - one device->host copy of position_ids (the one sync),
boundaries computed on the host, cu_seqlens copied back asynchronously from pinned memory - and hands it to every layer
as a keyword argument, which HF threads through the decoder layers into the attention function untouched. No layer
syncs.

Only packed batches (position_ids given, no attention_mask) take this path: for any other batch a pre-hook switches
the model back to its own attention implementation for that forward, so HF builds its usual (padding) mask and an
unpacked run is exactly HF's.

Everything is per model instance: a new name in HF's attention registry (no HF class is patched), the model's
``config._attn_implementation`` switched to it, hooks kept so ``remove_*`` restores the model exactly.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

ATTN_NAME = "optkit_packed"
METADATA_KWARG = "optkit_packed_metadata"  # the kwarg the decoder layers carry to the attention function


@dataclass(frozen=True)
class PackedMetadata:
    """Example boundaries of a flattened packed batch."""

    cu_seqlens: torch.Tensor  # (N + 1,) int32 on the activations' device: cumulative example starts, then total
    max_seqlen: int  # longest example
    boundaries: Tuple[int, ...]  # cu_seqlens as host ints (the per-example loop kernel slices with them)


@dataclass
class PackingStats:
    """Counts per model (integer adds, nothing synced): metadata builds, and which attention kernel ran."""

    per_layer_rebuilds: int = 0
    per_batch_builds: int = 0
    varlen_kernel_calls: int = 0  # torch's varlen flash kernel
    loop_kernel_calls: int = 0  # the per-example SDPA loop (CPU, fp32, torch < 2.10)

    def reset(self) -> None:
        self.__dict__.update(PackingStats().__dict__)


def build_packed_metadata(position_ids: torch.Tensor) -> PackedMetadata:
    """Once per batch: one device->host copy of position_ids; cu_seqlens computed on the host and sent back."""
    flat = position_ids.reshape(-1).to("cpu", copy=True).numpy()  # the one sync
    starts = np.flatnonzero(flat == 0)
    if starts.size == 0 or starts[0] != 0:
        raise ValueError("packed position_ids must start every row at 0 (optkit.data.packing.packed_batch does)")
    boundaries = tuple(int(s) for s in starts) + (int(flat.size),)
    max_seqlen = int(np.diff(np.asarray(boundaries)).max())
    cu_host = torch.tensor(boundaries, dtype=torch.int32)
    if position_ids.is_cuda:  # pinned: the copy back is asynchronous (from pageable memory it would block: a sync)
        cu_host = cu_host.pin_memory()
    return PackedMetadata(cu_host.to(position_ids.device, non_blocking=True), max_seqlen, boundaries)


def rebuild_metadata_like_hf(position_ids: torch.Tensor, need_host_boundaries: bool) -> PackedMetadata:
    """The per-layer baseline: HF's own flash-attention helpers, with the host syncs they imply (module doc)."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    flat = position_ids.reshape(1, -1)  # HF's padding-free layout: one (1, total) row
    if not _is_packed_sequence(flat, 1):  # sync 1 (a tensor in an `if`)
        total = flat.shape[1]
        return PackedMetadata(torch.tensor([0, total], dtype=torch.int32, device=flat.device), total, (0, total))
    (cu_seqlens, _), (max_length, _) = prepare_fa_kwargs_from_position_ids(flat)  # sync 2: nonzero inside
    max_seqlen = int(max_length)  # sync 3: the kernel takes an int
    boundaries = tuple(cu_seqlens.to("cpu", copy=True).tolist()) if need_host_boundaries else ()  # loop kernel only
    return PackedMetadata(cu_seqlens.to(torch.int32), max_seqlen, boundaries)


# --- the attention function registered with HF -------------------------------------------------------------------


def packed_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs
):
    """HF attention-interface function. query (B, Hq, T, D), key/value (B, Hkv, T, D) -> ((B, T, Hq, D), None)."""
    if dropout:
        raise NotImplementedError("packed attention has no attention dropout; set the model's attention_dropout to 0")
    batch, _, seq_len, head_dim = query.shape
    scale = head_dim**-0.5 if scaling is None else scaling
    stats = getattr(module, "_optkit_packing_stats", None) or PackingStats()
    use_varlen = _varlen_usable(query)
    metadata = kwargs.get(METADATA_KWARG)
    if metadata is None:
        if kwargs.get("position_ids") is None:
            raise ValueError(
                f"{type(module).__name__} passes no position_ids to its attention function; packed "
                "attention needs them (HF decoder models of transformers >= 5 pass them)"
            )
        position_ids = kwargs["position_ids"].expand(batch, -1)  # HF's default positions: one (1, T) row for all
        metadata = rebuild_metadata_like_hf(position_ids, need_host_boundaries=not use_varlen)
        stats.per_layer_rebuilds += 1
    if sliding_window is not None and metadata.max_seqlen > sliding_window:
        raise NotImplementedError(
            f"packed attention has no sliding window ({sliding_window} < an example of "
            f"{metadata.max_seqlen} tokens); use a full-attention model or shorter examples"
        )
    q, k, v = (t.transpose(1, 2).reshape(batch * seq_len, t.shape[1], head_dim) for t in (query, key, value))
    if use_varlen:
        stats.varlen_kernel_calls += 1
        out = _varlen_flash(q, k, v, metadata, scale)
    else:
        stats.loop_kernel_calls += 1
        out = _varlen_by_example(q, k, v, metadata, scale)
    return out.view(batch, seq_len, query.shape[1], head_dim), None


def _varlen_usable(query: torch.Tensor) -> bool:
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _varlen_api() is not None


@functools.lru_cache(maxsize=None)
def _varlen_api():
    """(torch's varlen_attn, its parameter names), or None before torch 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_flash(q, k, v, metadata: PackedMetadata, scale: float) -> torch.Tensor:
    """torch's varlen flash kernel on (total, H, D) tensors. Its keyword API moved between torch 2.10 and 2.12."""
    varlen_attn, params = _varlen_api()
    kwargs: Dict[str, Any] = {}
    if "window_size" in params:  # torch >= 2.11: causal is window (-1, 0)
        kwargs["window_size"] = (-1, 0)
    else:  # torch 2.10
        kwargs["is_causal"] = True
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:  # kernel's default scale is 1/sqrt(D): fold ours into q
        q = q * (scale * q.shape[-1] ** 0.5)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # the kernel wants as many kv heads as q heads before torch 2.12
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    cu = metadata.cu_seqlens
    return varlen_attn(q, k, v, cu, cu, metadata.max_seqlen, metadata.max_seqlen, **kwargs)


def _varlen_by_example(q, k, v, metadata: PackedMetadata, scale: float) -> torch.Tensor:
    """Reference-exact fallback: causal SDPA on each example's (1, H, L, D) slice."""
    out = torch.empty_like(q)
    enable_gqa = k.shape[1] != q.shape[1]
    for start, end in zip(metadata.boundaries[:-1], metadata.boundaries[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, L, D)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=enable_gqa)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


# --- install / cache / remove ------------------------------------------------------------------------------------


def install_packed_attention(model) -> List[str]:
    """Switch ``model`` to packed attention, metadata rebuilt per layer (the baseline). Idempotent."""
    base = decoder_stack(model)
    state = packing_state(model)
    if "previous_attn" in state:
        return []
    _register_attention()
    config = base.config
    state["previous_attn"] = config._attn_implementation
    state["route_hook"] = base.register_forward_pre_hook(_route_batch, with_kwargs=True)
    for attention in _attention_modules(base):  # a plain attribute (not a submodule): the counter they share
        attention._optkit_packing_stats = state["stats"]
    config._attn_implementation = ATTN_NAME
    return [
        f"packing: packed batches use {ATTN_NAME} attention (varlen; boundary metadata rebuilt per layer), "
        f"other batches keep {state['previous_attn']}"
    ]


def remove_packed_attention(model) -> None:
    """Undo ``install_packed_attention`` and the cache: the model's original attention implementation is back."""
    state = packing_state(model)
    handle = state.pop("cache_hook", None)  # opt.packed_metadata_cache's hook, if it added one
    if handle is not None:
        handle.remove()
    if "previous_attn" not in state:
        return
    state.pop("route_hook").remove()
    base = decoder_stack(model)
    for attention in _attention_modules(base):
        del attention._optkit_packing_stats
    base.config._attn_implementation = state.pop("previous_attn")


def packing_stats(model) -> PackingStats:
    """Counts on this model since packed attention was installed (``.reset()`` zeroes them)."""
    return packing_state(model)["stats"]


def _route_batch(module, args, kwargs):
    """Packed batches (position_ids and no attention_mask) take packed attention; any other batch takes the model's
    own attention implementation, with HF's usual mask, so installing packed attention never changes unpacked runs.
    Decided from the kwargs alone (no sync); gradient checkpointing recomputes under the same setting."""
    packed = kwargs.get("position_ids") is not None and kwargs.get("attention_mask") is None
    module.config._attn_implementation = ATTN_NAME if packed else module._optkit_packing_state["previous_attn"]
    return None


def _register_attention() -> None:
    from transformers import AttentionInterface

    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, packed_attention_forward)


def decoder_stack(model) -> torch.nn.Module:
    """The module holding the decoder layers (e.g. Qwen3Model), found through peft / CausalLM wrappers."""
    for module in model.modules():
        if isinstance(getattr(module, "layers", None), torch.nn.ModuleList) and hasattr(module, "embed_tokens"):
            return module
    raise ValueError(
        f"{type(model).__name__} has no decoder stack (a module with .layers and .embed_tokens); "
        "packed attention supports HF decoder-only causal LMs"
    )


def _attention_modules(base) -> List[torch.nn.Module]:
    return [layer.self_attn for layer in base.layers if hasattr(layer, "self_attn")]


def packing_state(model) -> Dict[str, Any]:
    base = decoder_stack(model)
    if not hasattr(base, "_optkit_packing_state"):
        base._optkit_packing_state = {"stats": PackingStats()}
    return base._optkit_packing_state
