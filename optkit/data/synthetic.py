"""Seeded synthetic token batches.

Throughput does not depend on token values, so random tokens measure what real text would; what
matters is the shape and how many tokens are real. ``data.pad_fraction`` right-pads each row (pad
tokens carry label -100 and attention_mask 0) so padded and packed layouts compare on real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    tensors: Dict[str, torch.Tensor]  # model kwargs: input_ids, labels, attention_mask / position_ids
    real_tokens: int  # tokens that are neither padding nor ignored positions of packing
    padded_tokens: int  # batch_size * seq_len

    def to(self, device) -> "Batch":
        return Batch(
            {k: v.to(device, non_blocking=True) for k, v in self.tensors.items()}, self.real_tokens, self.padded_tokens
        )


def synthetic_batch(
    batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator, pad_fraction: float = 0.0
) -> Batch:
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    labels = input_ids.clone()  # HF shifts labels inside the loss
    n_real = seq_len - int(round(seq_len * pad_fraction))
    n_real = max(1, n_real)
    tensors = {"input_ids": input_ids, "labels": labels}
    if n_real < seq_len:
        attention_mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
        attention_mask[:, :n_real] = 1
        labels[:, n_real:] = IGNORE_INDEX
        tensors["attention_mask"] = attention_mask
    return Batch(tensors, real_tokens=batch_size * n_real, padded_tokens=batch_size * seq_len)
