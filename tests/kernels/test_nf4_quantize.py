"""NF4 round trips against the ORIGINAL weights, not only against bitsandbytes' bits.

Every check is per element: |dequantized - original| <= half the NF4 code gap around original/absmax,
times the block absmax, plus one output-dtype rounding (and, with double quantization, the 8-bit scale's
error); tests/kernels/_nf4_bound.py derives that bound from the original weights alone. Shapes are chosen
so rows are not whole blocks ((256, 32), (64, 96) with blocksize 64: where bitsandbytes 0.50's CPU
dequantize_4bit is wrong), odd element counts and 3-D expert weights. Both dequantize paths run: the
Triton kernel (under TRITON_INTERPRET=1 here) and the PyTorch reference.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from optkit.kernels.nf4_dequantize import NF4_CODE, nf4_dequantize, nf4_quantize, reference_nf4_dequantize
from tests.kernels._nf4_bound import assert_roundtrip_within_nf4_bound, nested_scale_error, roundtrip_excess

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (pip install 'optkit[quant]')")

ODD_SHAPES = [
    ((256, 32), 64),  # a row is half a block
    ((64, 96), 64),  # a row is 1.5 blocks
    ((33, 70), 64),
    ((7, 9), 32),  # odd element count: the last low nibble is padding
    ((4096,), 64),
    ((3, 48, 70), 64),  # (E, out, in) expert weight
    ((130, 256), 128),
]


def _weight(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Linear-layer-like weights with a few outliers, so block absmaxes vary over orders of magnitude.
    weight = torch.randn(shape, generator=gen) * 0.02
    weight.view(-1)[::97] *= 30.0
    return weight.to(dtype)


def _dequantizers(monkeypatch):
    """(name, dequantize) for the Triton kernel and for the PyTorch reference."""

    def reference(packed, state, dtype=None):
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # nf4_dequantize's CPU fallback is the reference
        try:
            return nf4_dequantize(packed, state, dtype)
        finally:
            monkeypatch.setenv("TRITON_INTERPRET", "1")

    return [("kernel", nf4_dequantize), ("reference", reference)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,blocksize", ODD_SHAPES)
def test_optkit_quantize_roundtrip_matches_the_original_weights(shape, blocksize, dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    weight = _weight(shape, dtype, seed=len(shape) + shape[-1])
    packed, state = nf4_quantize(weight, blocksize)
    assert packed.dtype == torch.uint8 and packed.numel() == (weight.numel() + 1) // 2
    for name, dequantize in _dequantizers(monkeypatch):
        out = dequantize(packed, state)
        assert out.dtype == dtype, name
        assert_roundtrip_within_nf4_bound(weight, out, blocksize)
    torch.testing.assert_close(
        reference_nf4_dequantize(packed, state), nf4_dequantize(packed, state), rtol=0, atol=0
    )  # the two paths agree bit for bit too


def test_all_zero_blocks_and_exact_codes_come_back_exactly():
    weight = torch.zeros(3, 64)
    weight[1] = torch.tensor(NF4_CODE).repeat(4) * 0.5  # every code once per block, absmax 0.5
    packed, state = nf4_quantize(weight)
    out = reference_nf4_dequantize(packed, state)
    assert torch.equal(out, weight)


def test_the_bound_fails_a_wrong_dequantization():
    """The check can fail: the right codes read with high and low nibbles swapped exceed it."""
    weight = _weight((16, 64), torch.float32)
    packed, state = nf4_quantize(weight)
    swapped = ((packed & 0xF) << 4) | (packed >> 4)
    assert (roundtrip_excess(weight, reference_nf4_dequantize(swapped, state), 64) > 0).any()
    state.absmax = state.absmax.roll(1)  # a block read with its neighbour's scale
    assert (roundtrip_excess(weight, reference_nf4_dequantize(packed, state), 64) > 0).any()


def test_bad_blocksize_is_refused():
    with pytest.raises(ValueError, match="power-of-two blocksize"):
        nf4_quantize(torch.randn(4, 48), blocksize=48)


@needs_bnb
def test_codebook_and_codes_equal_bitsandbytes():
    import bitsandbytes.functional as bnbf

    assert torch.equal(torch.tensor(NF4_CODE), bnbf.get_4bit_type("nf4", device="cpu").float())
    for shape, blocksize in ODD_SHAPES:
        weight = _weight(shape, torch.bfloat16, seed=shape[0])
        packed, state = nf4_quantize(weight, blocksize)
        bnb_packed, bnb_state = bnbf.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4")
        assert torch.equal(packed, bnb_packed.view(-1)), shape
        assert torch.equal(state.absmax, bnb_state.absmax), shape


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", ODD_SHAPES)
def test_bitsandbytes_quantize_roundtrip_through_optkit(shape, blocksize, double_quant, monkeypatch):
    """bitsandbytes quantizes (what QLoRA's Linear4bit does); optkit's kernel and reference dequantize."""
    import bitsandbytes.functional as bnbf

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    weight = _weight(shape, torch.bfloat16, seed=shape[-1])
    packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    scale_error = nested_scale_error(weight, blocksize) if double_quant else 0.0
    for _, dequantize in _dequantizers(monkeypatch):
        assert_roundtrip_within_nf4_bound(weight, dequantize(packed, state), blocksize, scale_error)


def _tiny_linear_shapes():
    """(in, out) of every linear QLoRA quantizes in the tiny models CPU runs use."""
    shapes = set()
    for path in sorted((Path(__file__).parents[2] / "conf/model").glob("tiny_*.yaml")):
        c = OmegaConf.load(path).hf_config
        hidden, heads, kv = c.get("hidden_size"), c.get("num_attention_heads"), c.get("num_key_value_heads")
        head_dim = c.get("head_dim") or hidden // heads
        inter = c.get("intermediate_size")
        shapes |= {(hidden, heads * head_dim), (heads * head_dim, hidden), (hidden, kv * head_dim)}
        shapes |= {(hidden, inter), (inter, hidden)}
    return sorted(shapes)


@needs_bnb
def test_bitsandbytes_linear4bit_roundtrip_at_the_tiny_model_shapes():
    """CPU QLoRA baselines dequantize through bitsandbytes' own CPU dequantize_4bit: it must be right at the
    shapes those runs use (it is not where a row is not whole blocks, hence optkit's own for experts)."""
    import bitsandbytes.functional as bnbf

    from optkit.train.qlora import to_linear4bit

    shapes = _tiny_linear_shapes()
    assert len(shapes) >= 3, shapes
    for in_features, out_features in shapes:
        linear = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
        original = linear.weight.detach().clone()
        quantized = to_linear4bit(linear)
        state = quantized.weight.quant_state
        scale_error = nested_scale_error(original, state.blocksize)
        for out in (bnbf.dequantize_4bit(quantized.weight.data, state), nf4_dequantize(quantized.weight.data, state)):
            assert_roundtrip_within_nf4_bound(original, out, state.blocksize, scale_error)
