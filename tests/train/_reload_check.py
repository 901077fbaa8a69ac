"""Bitwise check of what the offload checkpointing modes reload (tests/train/test_checkpointing.py, on a GPU).

While active, every layer input handed to ``LayerInputOffloader.offload`` is kept (a device clone), and
every tensor ``reload`` returns is compared with it once its copy has finished; mismatches are
recorded as (layer index, max abs difference).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch

from optkit.train.checkpointing import LayerInputOffloader


@contextlib.contextmanager
def reload_mismatches() -> Iterator[List[Tuple[int, float]]]:
    kept, mismatches = {}, []
    real_offload, real_reload = LayerInputOffloader.offload, LayerInputOffloader.reload

    def keeping_offload(self, index, hidden):
        kept[index] = hidden.detach().clone()
        return real_offload(self, index, hidden)

    def checking_reload(self, index, like):
        out = real_reload(self, index, like)
        torch.cuda.current_stream().synchronize()  # what the recomputation will read, once the copy is done
        if not torch.equal(out, kept[index]):
            mismatches.append((index, (out.float() - kept[index].float()).abs().max().item()))
        return out

    LayerInputOffloader.offload, LayerInputOffloader.reload = keeping_offload, checking_reload
    try:
        yield mismatches
    finally:
        LayerInputOffloader.offload, LayerInputOffloader.reload = real_offload, real_reload
