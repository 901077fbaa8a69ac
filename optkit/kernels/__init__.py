"""optkit's Triton kernels: one file per op, each with its plain-PyTorch reference beside it.

    from optkit.kernels import rms_norm, apply_rotary, swiglu, geglu, cross_entropy
    from optkit.kernels import fused_linear_cross_entropy, nf4_dequantize

Each public function shares its name with its module, so the names are bound here explicitly after
the submodules are imported (otherwise the package attribute would be the module, not the function).
The kernel modules import only torch and triton; nf4_dequantize is bound lazily (it reads
bitsandbytes' quantization state layout).
"""

from importlib import import_module

from optkit.kernels.cross_entropy import CrossEntropyLoss, cross_entropy, reference_cross_entropy
from optkit.kernels.fused_linear_cross_entropy import (
    FusedLinearCrossEntropyLoss,
    fused_linear_cross_entropy,
    reference_fused_linear_cross_entropy,
)
from optkit.kernels.geglu import GeGLUMLP, geglu, reference_geglu
from optkit.kernels.rms_norm import RMSNorm, reference_rms_norm, rms_norm
from optkit.kernels.rope import apply_rotary, reference_rope
from optkit.kernels.swiglu import SwiGLUMLP, reference_swiglu, swiglu

_LAZY = {"nf4_dequantize": "nf4_dequantize", "reference_nf4_dequantize": "nf4_dequantize"}

__all__ = [
    "CrossEntropyLoss",
    "FusedLinearCrossEntropyLoss",
    "GeGLUMLP",
    "RMSNorm",
    "SwiGLUMLP",
    "apply_rotary",
    "cross_entropy",
    "fused_linear_cross_entropy",
    "geglu",
    "reference_cross_entropy",
    "reference_fused_linear_cross_entropy",
    "reference_geglu",
    "reference_rms_norm",
    "reference_rope",
    "reference_swiglu",
    "rms_norm",
    "swiglu",
    *_LAZY,
]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'optkit.kernels' has no attribute {name!r}")
    value = getattr(import_module(f"optkit.kernels.{_LAZY[name]}"), name)
    globals()[name] = value  # replaces the submodule attribute the import just bound
    return value
