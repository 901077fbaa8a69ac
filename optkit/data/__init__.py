"""Token batches for the measured training step: synthetic, learnable, packed.

``make_batches`` is the one entry the training loop uses; each source lives in its own module.
"""

from __future__ import annotations

from typing import List

import torch

from optkit.data.packing import LENGTH_DISTS, packed_batch, padded_batch
from optkit.data.synthetic import Batch, synthetic_batch

SOURCES = ("synthetic", "learnable")  # data.source
__all__ = ["LENGTH_DISTS", "SOURCES", "Batch", "make_batches"]


def make_batches(data_cfg, batch_size: int, vocab_size: int, n_batches: int, seed: int) -> List[Batch]:
    """``n_batches`` distinct CPU batches from a seeded generator (the loop cycles through them)."""
    generator = torch.Generator().manual_seed(seed)
    return [_one_batch(data_cfg, batch_size, vocab_size, generator) for _ in range(n_batches)]


def _one_batch(data_cfg, batch_size: int, vocab_size: int, generator: torch.Generator) -> Batch:
    if data_cfg.packing:
        return packed_batch(batch_size, data_cfg.seq_len, vocab_size, generator, data_cfg)
    if data_cfg.length_dist != "fixed":
        # The same variable-length examples as the packed layout, one per row, padded to the longest:
        # packed vs unpacked compare on exactly the same real tokens.
        return padded_batch(batch_size, data_cfg.seq_len, vocab_size, generator, data_cfg)
    if data_cfg.source == "learnable":
        from optkit.data.learnable import learnable_batch

        return learnable_batch(batch_size, data_cfg.seq_len, vocab_size, generator)
    return synthetic_batch(batch_size, data_cfg.seq_len, vocab_size, generator, data_cfg.pad_fraction)
