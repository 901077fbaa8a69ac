"""Packed and padded batches of variable-length examples (optkit.data.packing)."""

import pytest
import torch

from optkit.config.schema import DataConfig
from optkit.data.packing import (
    draw_packed_rows,
    example_lengths,
    load_length_histogram,
    packed_batch,
    padded_batch,
    sample_lengths,
)
from optkit.data.synthetic import IGNORE_INDEX

VOCAB = 97


def _cfg(**overrides) -> DataConfig:
    return DataConfig(**{"packing": True, "length_dist": "uniform", "min_len": 3, "max_len": 40, **overrides})


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _examples_of_packed(batch, rows):
    """Token lists of the real examples, cut out of the packed rows at the positions where position ids restart."""
    ids, pos = batch.tensors["input_ids"], batch.tensors["position_ids"]
    examples = []
    for r, row in enumerate(rows):
        starts = (pos[r] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
        examples += [ids[r, a:b].tolist() for a, b in zip(starts[: len(row)], starts[1 : len(row) + 1])]
    return examples


@pytest.mark.parametrize("dist", ["fixed", "uniform", "empirical"])
@pytest.mark.parametrize("batch_size,seq_len", [(1, 64), (3, 97), (4, 512)])
def test_packed_rows_are_full_and_positions_restart_at_every_example(dist, batch_size, seq_len):
    cfg = _cfg(length_dist=dist, max_len=37)
    batch = packed_batch(batch_size, seq_len, VOCAB, _gen(1), cfg)
    pos, labels = batch.tensors["position_ids"], batch.tensors["labels"]
    assert set(batch.tensors) == {"input_ids", "labels", "position_ids"}
    assert pos.shape == labels.shape == (batch_size, seq_len)
    assert batch.padded_tokens == batch_size * seq_len
    rows = draw_packed_rows(batch_size, seq_len, _gen(1), cfg)
    assert len(rows) == batch_size and all(sum(row) <= seq_len for row in rows)
    assert batch.real_tokens == sum(map(sum, rows))
    # inside a segment positions count up by one; a new segment starts at 0
    step = pos[:, 1:] - pos[:, :-1]
    assert ((step == 1) | (pos[:, 1:] == 0)).all()
    assert (pos[:, 0] == 0).all()


def test_loss_never_crosses_an_example_boundary():
    """HF's loss compares logits[t] with labels[t + 1]: a trained target must sit in the same example as t."""
    batch = packed_batch(4, 256, VOCAB, _gen(2), _cfg())
    pos, labels, ids = (batch.tensors[k] for k in ("position_ids", "labels", "input_ids"))
    trained = labels[:, 1:] != IGNORE_INDEX
    assert (pos[:, 1:][trained] == pos[:, :-1][trained] + 1).all()
    assert (labels[:, 1:][trained] == ids[:, 1:][trained]).all()
    assert (labels[pos == 0] == IGNORE_INDEX).all()  # every example's first label is masked
    # targets per example = length - 1, so the number of trained labels = real tokens - examples
    n_examples = sum(len(row) for row in draw_packed_rows(4, 256, _gen(2), _cfg()))
    assert int(trained.sum()) == batch.real_tokens - n_examples


def test_padded_batch_holds_the_same_examples_and_targets():
    cfg = _cfg(max_len=50)
    packed = packed_batch(3, 128, VOCAB, _gen(3), cfg)
    padded = padded_batch(3, 128, VOCAB, _gen(3), cfg)
    rows = draw_packed_rows(3, 128, _gen(3), cfg)
    lengths = [length for row in rows for length in row]
    mask = padded.tensors["attention_mask"]
    assert mask.shape == (len(lengths), max(lengths))
    assert mask.sum(1).tolist() == lengths
    assert padded.real_tokens == packed.real_tokens == sum(lengths)
    assert padded.padded_tokens == len(lengths) * max(lengths)
    packed_examples = _examples_of_packed(packed, rows)
    padded_examples = [padded.tensors["input_ids"][r, :n].tolist() for r, n in enumerate(lengths)]
    assert packed_examples == padded_examples
    # the same number of trained targets (HF drops labels[0] of each padded row by its shift)
    packed_targets = int((packed.tensors["labels"][:, 1:] != IGNORE_INDEX).sum())
    padded_targets = int((padded.tensors["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert packed_targets == padded_targets == sum(lengths) - len(lengths)
    assert (padded.tensors["labels"][mask == 0] == IGNORE_INDEX).all()


def test_example_lengths_reads_segments_back():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    assert example_lengths(pos) == [3, 2, 1, 4, 2]


def test_lengths_follow_the_requested_distribution():
    n = 20000
    fixed = sample_lengths(50, 300, _gen(), _cfg(length_dist="fixed", max_len=123))
    assert (fixed == 123).all()
    uniform = sample_lengths(n, 300, _gen(), _cfg(min_len=10, max_len=20))
    assert uniform.min() == 10 and uniform.max() == 20
    assert abs(uniform.double().mean().item() - 15.0) < 0.1
    assert (sample_lengths(100, 8, _gen(), _cfg(min_len=5, max_len=50)) <= 8).all()  # truncated to seq_len


def test_empirical_lengths_match_the_shipped_histogram():
    lows, highs, probs = load_length_histogram(None)
    assert abs(probs.sum().item() - 1.0) < 1e-9
    assert (lows[1:] == highs[:-1] + 1).all()  # contiguous bins
    n = 40000
    lengths = sample_lengths(n, 32768, _gen(5), _cfg(length_dist="empirical"))
    bins = torch.bucketize(lengths, highs, right=False)
    freq = torch.bincount(bins, minlength=len(probs)).double() / n
    # 4 standard errors of a binomial frequency, per bin
    tolerance = 4 * (probs * (1 - probs) / n).sqrt() + 1e-4
    assert ((freq - probs).abs() <= tolerance).all(), (freq - probs).abs().max()
    assert 370 < lengths.double().median().item() < 420  # the card's median is 393
    assert 500 < lengths.double().mean().item() < 570  # the card's mean is 528


def test_same_seed_same_batch_and_a_different_seed_differs():
    a = packed_batch(2, 128, VOCAB, _gen(7), _cfg())
    b = packed_batch(2, 128, VOCAB, _gen(7), _cfg())
    c = packed_batch(2, 128, VOCAB, _gen(8), _cfg())
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert not torch.equal(a.tensors["input_ids"], c.tensors["input_ids"])


def test_bad_length_settings_say_what_to_fix(tmp_path):
    with pytest.raises(ValueError, match="min_len <= data.max_len"):
        sample_lengths(3, 64, _gen(), _cfg(min_len=30, max_len=10))
    with pytest.raises(FileNotFoundError, match="lengths_csv"):
        sample_lengths(3, 64, _gen(), _cfg(length_dist="empirical", lengths_csv=str(tmp_path / "none.csv")))
    bad = tmp_path / "bad.csv"
    bad.write_text("min_len,max_len,weight\n10,5,1.0\n")
    with pytest.raises(ValueError, match="min_len <= max_len"):
        load_length_histogram(str(bad))
