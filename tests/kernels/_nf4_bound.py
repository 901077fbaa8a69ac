"""What an NF4 round trip may lose, per element, computed from the original weights alone.

An element ``w`` of a block with absmax ``a`` is stored as the NF4 code nearest to ``w / a``, so its
dequantized value is off by at most half the gap between the two codes around ``w / a``, times ``a``;
then one rounding to the output dtype (at most ``a * eps``). With double quantization the block scale
itself is stored in 8 bits: ``scale_error`` adds that error's bound (|code| <= 1 multiplies it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from optkit.kernels.nf4_dequantize import NF4_CODE

# bitsandbytes' 8-bit dynamic map (the nested absmax code) has its widest gap, 0.0141, next to 1.0:
# a nested scale is off by at most half of that times its nested block's absmax.
NESTED_HALF_GAP = 0.0075


def block_absmax(original: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Each element's block absmax (float64, flattened row-major like the quantizers)."""
    w = original.detach().double().reshape(-1)
    padded = F.pad(w, (0, -w.numel() % blocksize)).view(-1, blocksize)
    return padded.abs().amax(dim=1).repeat_interleave(blocksize)[: w.numel()]


def nested_scale_error(original: torch.Tensor, blocksize: int) -> float:
    """Bound on |stored scale - block absmax| under double quantization (absmax - mean, 8 bits per value)."""
    w = original.detach().double().reshape(-1)
    absmax = F.pad(w, (0, -w.numel() % blocksize)).view(-1, blocksize).abs().amax(dim=1)
    return NESTED_HALF_GAP * float((absmax - absmax.mean()).abs().max())


def roundtrip_excess(original: torch.Tensor, dequantized: torch.Tensor, blocksize: int, scale_error: float = 0.0):
    """Per element, |dequantized - original| minus the NF4 bound: > 0 wherever the round trip is wrong."""
    w = original.detach().double().reshape(-1)
    absmax = block_absmax(original, blocksize)
    code = torch.tensor(NF4_CODE, dtype=torch.float64)
    x = (w / absmax.clamp(min=1e-300)).clamp(-1.0, 1.0)
    low = (torch.searchsorted(code, x, right=True) - 1).clamp(0, len(NF4_CODE) - 2)
    half_gap = (code[low + 1] - code[low]) / 2
    eps = torch.finfo(dequantized.dtype).eps
    allowed = half_gap * absmax * (1 + 1e-6) + absmax * eps + scale_error
    return (dequantized.detach().double().reshape(-1) - w).abs() - allowed


def assert_roundtrip_within_nf4_bound(original, dequantized, blocksize, scale_error=0.0):
    assert dequantized.shape == original.shape, (dequantized.shape, original.shape)
    excess = roundtrip_excess(original, dequantized, blocksize, scale_error)
    worst = int(excess.argmax())
    assert excess[worst] <= 0, (
        f"{int((excess > 0).sum())} of {excess.numel()} elements exceed the NF4 bound; worst: element {worst}, "
        f"original {float(original.reshape(-1)[worst]):.4g}, dequantized {float(dequantized.reshape(-1)[worst]):.4g}, "
        f"block absmax {float(block_absmax(original, blocksize)[worst]):.4g}"
    )
