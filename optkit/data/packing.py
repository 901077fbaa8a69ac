"""Variable-length SFT-like examples: padding-free packed rows, or the same examples padded.

Example lengths come from ``data.length_dist``:
  fixed      every example has ``data.max_len`` tokens;
  uniform    integers uniform in [``data.min_len``, ``data.max_len``];
  empirical  a histogram CSV (``data.lengths_csv``, default the shipped ``sft_lengths.csv``: bins drawn by weight,
             a length uniform inside its bin).
Lengths above ``seq_len`` are truncated to it, as SFT trainers truncate to their max sequence length.

``packed_batch`` fills ``batch_size`` rows of ``seq_len`` tokens greedily (next-fit: an example that does not fit the
current row starts the next one); the example that overflows the last row is dropped. Position ids restart at 0 at
every example, which is how HF (and optkit.train.packing) find the boundaries. A row's unused tail is padding: its own
segment (positions restart at 0, label -100) so it attends to nothing real.

``padded_batch`` draws exactly the same examples (same generator state -> same lengths and tokens), one per row, right-
padded to the longest, with an attention_mask. Both count ``real_tokens`` as the examples' tokens, so tokens/s compare
honestly; their mean losses over the same targets are equal.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from optkit.data.synthetic import IGNORE_INDEX, Batch

LENGTH_DISTS = ("fixed", "uniform", "empirical")  # data.length_dist: example lengths before packing

DEFAULT_LENGTHS_CSV = Path(__file__).resolve().parent / "sft_lengths.csv"
PAD_TOKEN_ID = 0  # value irrelevant: pad positions carry label -100 and are never attended by real tokens


@lru_cache(maxsize=8)
def load_length_histogram(path: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(min_len, max_len, probability) per bin from a ``min_len,max_len,weight`` CSV ('#' lines are comments)."""
    path = Path(path) if path else DEFAULT_LENGTHS_CSV
    if not path.is_file():
        raise FileNotFoundError(
            f"data.lengths_csv={str(path)!r} does not exist; give a CSV with columns min_len,max_len,weight"
        )
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(line for line in handle if not line.lstrip().startswith("#")))
    try:
        lows = torch.tensor([int(r["min_len"]) for r in rows])
        highs = torch.tensor([int(r["max_len"]) for r in rows])
        weights = torch.tensor([float(r["weight"]) for r in rows], dtype=torch.float64)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: every row needs integer min_len, max_len and a float weight ({exc})") from None
    if not rows or (lows < 1).any() or (highs < lows).any() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"{path}: need >= 1 bin with 1 <= min_len <= max_len and non-negative weights summing > 0")
    return lows, highs, weights / weights.sum()


def sample_lengths(n: int, seq_len: int, generator: torch.Generator, data_cfg) -> torch.Tensor:
    """``n`` example lengths (int64) from ``data_cfg.length_dist``, each clipped to [1, seq_len]."""
    dist = data_cfg.length_dist
    if dist == "fixed":
        lengths = torch.full((n,), int(data_cfg.max_len))
    elif dist == "uniform":
        if not 1 <= data_cfg.min_len <= data_cfg.max_len:
            raise ValueError(
                f"uniform lengths need 1 <= data.min_len <= data.max_len, got {data_cfg.min_len}, {data_cfg.max_len}"
            )
        lengths = torch.randint(data_cfg.min_len, data_cfg.max_len + 1, (n,), generator=generator)
    elif dist == "empirical":
        lows, highs, probs = load_length_histogram(data_cfg.lengths_csv)
        bins = torch.multinomial(probs, n, replacement=True, generator=generator)
        offsets = torch.rand(n, generator=generator, dtype=torch.float64) * (highs[bins] - lows[bins] + 1)
        lengths = lows[bins] + offsets.long()
    else:
        raise ValueError(f"data.length_dist={dist!r} unknown; choose one of: {', '.join(LENGTH_DISTS)}")
    return lengths.clamp(1, seq_len)


def draw_packed_rows(batch_size: int, seq_len: int, generator: torch.Generator, data_cfg) -> List[List[int]]:
    """Example lengths per row, packed next-fit into ``batch_size`` rows of at most ``seq_len`` tokens."""
    rows: List[List[int]] = [[]]
    used = 0
    while True:
        length = int(sample_lengths(1, seq_len, generator, data_cfg)[0])
        if used + length > seq_len:  # does not fit: close this row; the example opens the next one
            if len(rows) == batch_size:
                return rows
            rows.append([])
            used = 0
        rows[-1].append(length)
        used += length


def packed_batch(batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator, data_cfg) -> Batch:
    """Padding-free rows: input_ids, labels, position_ids (B, T); no attention_mask (boundaries are in position_ids)."""
    rows = draw_packed_rows(batch_size, seq_len, generator, data_cfg)
    tokens = _example_tokens(rows, vocab_size, generator)
    input_ids = torch.full((batch_size, seq_len), PAD_TOKEN_ID, dtype=torch.long)
    labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
    cursor = 0
    for r, row in enumerate(rows):
        start = 0
        for length in row:
            end = start + length
            input_ids[r, start:end] = tokens[cursor : cursor + length]
            labels[r, start:end] = tokens[cursor : cursor + length]
            # HF's loss compares logits[t] with labels[t + 1]: masking each example's first label stops the previous
            # example's last token from being trained to predict it (the loss never crosses a boundary).
            labels[r, start] = IGNORE_INDEX
            position_ids[r, start:end] = torch.arange(length)
            start, cursor = end, cursor + length
        position_ids[r, start:] = torch.arange(seq_len - start)  # the padding tail is a segment of its own
    tensors = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    return Batch(tensors, real_tokens=cursor, padded_tokens=batch_size * seq_len)


def padded_batch(batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator, data_cfg) -> Batch:
    """The examples ``packed_batch`` would draw from this generator state, one per row, right-padded to the longest.

    Rows = number of examples (not ``batch_size``): the same real tokens as the packed batch, laid out padded.
    """
    rows = draw_packed_rows(batch_size, seq_len, generator, data_cfg)
    tokens = _example_tokens(rows, vocab_size, generator)
    lengths = [length for row in rows for length in row]
    longest = max(lengths)
    input_ids = torch.full((len(lengths), longest), PAD_TOKEN_ID, dtype=torch.long)
    labels = torch.full((len(lengths), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), longest), dtype=torch.long)
    cursor = 0
    for r, length in enumerate(lengths):
        input_ids[r, :length] = tokens[cursor : cursor + length]
        labels[r, :length] = tokens[cursor : cursor + length]
        attention_mask[r, :length] = 1
        cursor += length
    tensors = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    return Batch(tensors, real_tokens=cursor, padded_tokens=len(lengths) * longest)


def example_lengths(position_ids: torch.Tensor) -> List[int]:
    """Segment lengths of packed rows, read back from position ids (row tails included as their own segment)."""
    flat = position_ids.reshape(-1).tolist()
    starts = [i for i, p in enumerate(flat) if p == 0] + [len(flat)]
    return [b - a for a, b in zip(starts[:-1], starts[1:])]


def _example_tokens(rows: List[List[int]], vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """All examples' tokens as one stream (drawn after the lengths, so packed and padded get identical tokens)."""
    n_real = sum(sum(row) for row in rows)
    return torch.randint(0, vocab_size, (n_real,), generator=generator)
