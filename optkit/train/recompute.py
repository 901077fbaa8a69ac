"""Whether this thread is inside the recompute of a whole checkpointed decoder layer.

Under gradient checkpointing each decoder layer runs again in backward to rebuild what its backward saved.
That recompute's output is thrown away, so a value that only the layer's output reads need not be computed
there (opt.recompute_skips_mlp_down). The checkpointing code marks the recompute:

- optkit's offload modes (optkit/train/checkpointing.py) enter ``layer_recompute`` around the layer rerun;
- HF's non-reentrant ``torch.utils.checkpoint`` takes ``checkpoint_contexts`` as its ``context_fn`` (a
  forward context that marks nothing, a recompute context that marks); ``with_recompute_mark`` adds it to
  the checkpoint function HF keeps on a layer.

The mark is thread-local: on a GPU the autograd engine runs backward, and so every recompute, on a thread
of its own per device, and the mark is set and read on that thread. Nothing is marked in a forward, in a
reentrant checkpoint's recompute, or in any checkpoint that did not get this context.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Optional, Tuple, Union

import torch.utils.checkpoint

_state = threading.local()


def in_layer_recompute() -> bool:
    """True only while this thread reruns a whole decoder layer for its backward."""
    return getattr(_state, "depth", 0) > 0


class layer_recompute:
    """Marks a decoder layer's recompute while entered. Cleared on every exit, including the exception with
    which non-reentrant checkpoint stops a recompute early once it has every saved tensor. Re-enterable:
    checkpoint makes it in forward and enters it once per recompute (a graph backwarded twice with
    retain_graph=True recomputes twice)."""

    def __enter__(self) -> None:
        _state.depth = getattr(_state, "depth", 0) + 1

    def __exit__(self, *exc_info) -> bool:
        _state.depth -= 1
        return False  # never swallows the exception


def checkpoint_contexts() -> Tuple[contextlib.AbstractContextManager, layer_recompute]:
    """``context_fn`` of ``torch.utils.checkpoint``: (forward context, recompute context)."""
    return contextlib.nullcontext(), layer_recompute()


def with_recompute_mark(func: Optional[Callable]) -> Union[Callable, str]:
    """HF's per-layer checkpoint function (``partial(torch.utils.checkpoint.checkpoint, **kwargs)``) with
    ``checkpoint_contexts`` added, ``func`` itself when it has it, or why it cannot carry it."""
    checkpoint = torch.utils.checkpoint.checkpoint
    if not isinstance(func, functools.partial) or func.func is not checkpoint or func.args:
        return "HF's checkpoint function is not a plain torch.utils.checkpoint (offloaded or replaced)"
    kwargs = func.keywords
    if kwargs.get("context_fn") is checkpoint_contexts:
        return func
    if kwargs.get("use_reentrant", True) is not False:
        return "HF gradient checkpointing is reentrant (pass gradient_checkpointing_kwargs={'use_reentrant': False})"
    if "context_fn" in kwargs or kwargs.get("debug"):
        return "HF gradient checkpointing carries its own context_fn or debug mode"
    return functools.partial(checkpoint, **kwargs, context_fn=checkpoint_contexts)
