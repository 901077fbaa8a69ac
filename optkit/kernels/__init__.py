"""optkit's Triton kernels: one file per op, each with its plain-PyTorch reference beside it.

The functional API is exported here lazily (importing one op does not compile or import the rest):

    from optkit.kernels import rms_norm, apply_rotary, swiglu, geglu, cross_entropy
    from optkit.kernels import fused_linear_cross_entropy, nf4_dequantize
"""
from importlib import import_module

_EXPORTS = {
    "rms_norm": "rms_norm", "reference_rms_norm": "rms_norm", "RMSNorm": "rms_norm",
    "apply_rotary": "rope", "reference_rope": "rope",
    "swiglu": "swiglu", "reference_swiglu": "swiglu", "SwiGLUMLP": "swiglu",
    "geglu": "geglu", "reference_geglu": "geglu", "GeGLUMLP": "geglu",
    "cross_entropy": "cross_entropy", "reference_cross_entropy": "cross_entropy",
    "CrossEntropyLoss": "cross_entropy",
    "fused_linear_cross_entropy": "fused_linear_cross_entropy",
    "reference_fused_linear_cross_entropy": "fused_linear_cross_entropy",
    "FusedLinearCrossEntropyLoss": "fused_linear_cross_entropy",
    "nf4_dequantize": "nf4_dequantize", "reference_nf4_dequantize": "nf4_dequantize",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'optkit.kernels' has no attribute {name!r}")
    return getattr(import_module(f"optkit.kernels.{_EXPORTS[name]}"), name)
