"""Deterministic token sequences a small model can learn: the data of convergence runs.

Random tokens (``synthetic``) keep the loss at log(vocab) forever, so they cannot show whether an
optimization changes what the model learns. Here every row follows one of a few fixed affine rules
over a small alphabet, ``x[t+1] = (a * x[t] + b) mod A``: a model first learns which tokens occur
(loss drops from log(vocab) to about log(A)), then each rule's bigram table (about log(len(RULES))),
then to infer a row's rule from its first transitions in context (towards 0). Each stage is a clear
drop in the loss curve within a few hundred steps of a tiny model, and two runs that learn alike give
curves that stay together.

The rules are constants (not drawn from the generator), so every batch of every run shares them; the
generator only picks each row's rule and first token.
"""

from __future__ import annotations

import torch

from optkit.data.synthetic import Batch

# (a, b) of x -> (a * x + b) mod A. Odd multipliers make each rule a permutation of a power-of-two
# alphabet, so no token is a dead end and every token is a possible next token under some rule.
RULES = ((1, 1), (3, 7), (5, 13), (7, 29))
MAX_ALPHABET = 64  # small enough for a 64-wide model to learn all bigram tables in ~100 steps
TOKEN_OFFSET = 1  # token id 0 is the pad id of several families (a zero, frozen embedding row)


def alphabet_size(vocab_size: int) -> int:
    """How many distinct token ids the sequences use for a model of ``vocab_size``."""
    if vocab_size < TOKEN_OFFSET + 2:
        raise ValueError(f"learnable data needs vocab_size >= {TOKEN_OFFSET + 2}, got {vocab_size}")
    return min(MAX_ALPHABET, vocab_size - TOKEN_OFFSET)


def learnable_batch(batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator) -> Batch:
    """``batch_size`` rows of ``seq_len`` tokens, each row one rule of ``RULES`` from a random start."""
    alphabet = alphabet_size(vocab_size)
    rule_index = torch.randint(0, len(RULES), (batch_size,), generator=generator)
    rules = torch.tensor(RULES, dtype=torch.long)[rule_index]  # (B, 2)
    a, b = rules[:, 0], rules[:, 1]
    x = torch.empty(batch_size, seq_len, dtype=torch.long)
    x[:, 0] = torch.randint(0, alphabet, (batch_size,), generator=generator)
    for t in range(1, seq_len):
        x[:, t] = (a * x[:, t - 1] + b) % alphabet
    input_ids = x + TOKEN_OFFSET
    tensors = {"input_ids": input_ids, "labels": input_ids.clone()}  # HF shifts labels inside the loss
    n_tokens = batch_size * seq_len
    return Batch(tensors, real_tokens=n_tokens, padded_tokens=n_tokens)
