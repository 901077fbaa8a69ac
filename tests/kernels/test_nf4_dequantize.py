"""NF4 dequantize: bit-exact against bitsandbytes' own dequantize_4bit (and our PyTorch reference).

Tolerance: none. The kernel does the same fp32 operations in the same order as bitsandbytes and
rounds once (to nearest even), so every output must equal bitsandbytes' bit for bit, in every dtype.
"""

from __future__ import annotations

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from optkit.kernels.nf4_dequantize import NF4Dequantizer, nf4_dequantize, reference_nf4_dequantize  # noqa: E402
from tests.kernels._tolerances import OPCHECKS  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _quantized(shape, dtype, double_quant, blocksize=64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    # Linear-layer-like weights with a few outliers, so block scales vary over orders of magnitude.
    weight = torch.randn(shape, generator=gen) * 0.02
    weight.view(-1)[::97] *= 30.0
    weight = weight.to(device=device, dtype=dtype)
    return bnb_functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def _assert_bitwise_equal(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.shape == expected.shape and out.dtype == expected.dtype
    mismatch = out.view(-1).view(torch.uint8 if out.dtype == torch.float32 else torch.int16) != expected.view(-1).view(
        torch.uint8 if out.dtype == torch.float32 else torch.int16
    )
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} values differ from bitsandbytes; max abs diff "
        f"{(out.float() - expected.float()).abs().max().item():.3e}"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((96, 200), 64), ((33, 70), 64), ((7, 10), 32), ((130, 256), 128)])
def test_matches_bitsandbytes_bitwise(shape, blocksize, dtype, double_quant):
    packed, state = _quantized(shape, dtype, double_quant, blocksize)
    expected = bnb_functional.dequantize_4bit(packed, state)
    _assert_bitwise_equal(nf4_dequantize(packed, state), expected)
    _assert_bitwise_equal(reference_nf4_dequantize(packed, state), expected)


def test_odd_element_count_pads_the_last_low_nibble():
    # bitsandbytes' CPU path for an odd last dimension goes through torch.compile: one case is enough.
    packed, state = _quantized((7, 9), torch.bfloat16, True, blocksize=32)
    assert packed.numel() == 32  # 63 codes, the last byte's low nibble is padding
    _assert_bitwise_equal(nf4_dequantize(packed, state), bnb_functional.dequantize_4bit(packed, state))


def test_nested_absmax_spans_several_nested_blocks():
    # 256 x 192 weights / 64 = 768 absmax codes: three nested blocks of 256, so the nested index matters.
    packed, state = _quantized((256, 192), torch.bfloat16, True)
    assert state.state2.absmax.numel() == 3
    _assert_bitwise_equal(nf4_dequantize(packed, state), bnb_functional.dequantize_4bit(packed, state))


def test_bf16_rounds_ties_to_even():
    """code 1.0 x absmax 1 + 3/256 lies exactly between two bf16 values: nearest-even rounds it up to
    1.015625 where truncation would give 1.0078125 (the CPU interpreter's own cast truncates)."""
    packed, state = _quantized((4, 64), torch.bfloat16, False)
    packed.fill_(0xFF)  # both nibbles = code 15 = +1.0
    state.absmax.fill_(1.0 + 3.0 / 256.0)
    out = nf4_dequantize(packed, state)
    assert torch.all(out == 1.015625), out.unique()
    _assert_bitwise_equal(out, bnb_functional.dequantize_4bit(packed, state))


def test_output_dtype_override_rounds_once():
    packed, state = _quantized((64, 64), torch.float32, True)
    fp32 = nf4_dequantize(packed, state)
    _assert_bitwise_equal(nf4_dequantize(packed, state, torch.bfloat16), fp32.to(torch.bfloat16))


def test_fp4_is_refused_with_a_pointer():
    weight = torch.randn(8, 64)
    packed, state = bnb_functional.quantize_4bit(weight, quant_type="fp4")
    with pytest.raises(ValueError, match="NF4 only"):
        nf4_dequantize(packed, state)


def test_out_writes_rows_of_a_larger_buffer_and_a_prepared_dequantizer_reruns():
    """Fused LoRA dequantizes Q, K and V into row blocks of one buffer with a dequantizer prepared once."""
    parts = [_quantized(shape, torch.bfloat16, True, seed=i) for i, shape in enumerate([(48, 64), (16, 64), (16, 64)])]
    buffer = torch.full((80, 64), float("nan"), dtype=torch.bfloat16)
    row = 0
    for packed, state in parts:
        dequantize = NF4Dequantizer(packed, state)
        assert dequantize.is_for(packed, state)
        rows = buffer[row : row + state.shape[0]]
        assert dequantize(torch.bfloat16, out=rows).data_ptr() == rows.data_ptr()
        _assert_bitwise_equal(rows, bnb_functional.dequantize_4bit(packed, state))
        _assert_bitwise_equal(dequantize(torch.bfloat16), rows)  # a second run gives the same bits
        row += state.shape[0]
    other_packed, other_state = parts[1]
    assert not NF4Dequantizer(*parts[0]).is_for(other_packed, other_state)


def test_out_of_the_wrong_shape_or_dtype_is_refused():
    packed, state = _quantized((16, 64), torch.bfloat16, True)
    for bad in (
        torch.empty(16, 32, dtype=torch.bfloat16),
        torch.empty(16, 64, dtype=torch.float16),
        torch.empty(64, 16, dtype=torch.bfloat16).t(),
    ):
        with pytest.raises(ValueError, match="out= must be a contiguous"):
            nf4_dequantize(packed, state, torch.bfloat16, out=bad)


def test_custom_op_registration():
    packed, state = _quantized((16, 128), torch.bfloat16, True)
    nested = state.state2
    args = (
        packed.view(-1),
        state.absmax,
        nested.absmax,
        nested.code,
        state.offset.reshape(1).float(),
        state.code,
        64,
        nested.blocksize,
        [16, 128],
        2,
    )
    torch.library.opcheck(torch.ops.optkit.nf4_dequantize.default, args, test_utils=OPCHECKS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# Llama-3-8B's weights: gate/up, down, q/o, k/v projections
@pytest.mark.parametrize("shape", [(4096, 14336), (14336, 4096), (4096, 4096), (1024, 4096)])
def test_matches_bitsandbytes_bitwise_gpu(shape, dtype):
    packed, state = _quantized(shape, dtype, True, device="cuda")
    expected = bnb_functional.dequantize_4bit(packed, state)
    _assert_bitwise_equal(nf4_dequantize(packed, state), expected)
    _assert_bitwise_equal(reference_nf4_dequantize(packed, state), expected)
