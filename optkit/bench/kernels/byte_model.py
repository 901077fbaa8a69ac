"""The bytes each op of the kernels suite must move: a lower bound every implementation is held to,
what a row's GB/s divides by (N tokens, s bytes per element of the benchmark dtype; int64 targets;
fp32 per-row statistics; "+" terms are small):

| op                    | forward                                   | backward                                        |
|-----------------------|-------------------------------------------|-------------------------------------------------|
| rms_norm (N, H)       | read x, w; write y (+ rstd N*4)           | read dy, x, w, rstd; write dx, dw               |
| rope q (B,Hq,S,D), k  | read q, k, cos, sin (S*D); write q', k'   | read dq', dk', cos, sin; write dq, dk           |
| swiglu / geglu (N, I) | read gate, up; write out (3*N*I*s)        | read dout, gate, up; write dgate, dup (5*N*I*s) |
| cross_entropy (N, V)  | read logits (+ target); write lse (N*4)   | read logits, lse, target; write dlogits         |
| FLCE h (N,H), W (V,H) | read h, W (+ target)                      | read h, W again; write dh, dW                   |
| nf4_dequantize (O, I) | read codes (n/2), absmax codes (n/64)     | none: forward-only (the weight is frozen)       |
|                       | (+ nested scales, code tables); write n*s |                                                 |

"full" is forward + backward (the forward alone for a forward-only op). The counts are logical
traffic: a fused cross entropy that re-reads a row's logits from L2 in its gradient pass moves less
through HBM and can show > 100% of copy. An implementation may move more than the bound:
bitsandbytes' NF4 dequantize writes its absmax as an fp32 buffer and reads it back (4 + 4 bytes per
64 weights), which the op need not move and which is therefore not counted.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

Dims = Dict[str, int]  # a case's named sizes (Case.dims of optkit/bench/kernels/cases.py)
Params = Dict[str, Any]  # its non-tensor arguments (Case.params)

FP32 = 4
NF4_CODE_VALUES = 16  # the NF4 code table: 16 fp32 values
NESTED_CODE_VALUES = 256  # double quantization's 8-bit dynamic code table: 256 fp32 values


def rms_norm_bytes(d: Dims, params: Params, s: int) -> Tuple[int, int]:
    n, h = d["T"], d["H"]
    fwd = 2 * n * h * s + h * s + FP32 * n
    bwd = 3 * n * h * s + 2 * h * s + FP32 * n
    return fwd, bwd


def rope_bytes(d: Dims, params: Params, s: int) -> Tuple[int, int]:
    qk = d["B"] * d["S"] * (d["Hq"] + d["Hkv"]) * d["D"] * s
    cos_sin = 2 * d["S"] * d["D"] * s
    return 2 * qk + cos_sin, 2 * qk + cos_sin


def gated_bytes(d: Dims, params: Params, s: int) -> Tuple[int, int]:
    n_i = d["T"] * d["I"]
    return 3 * n_i * s, 5 * n_i * s


def ce_bytes(d: Dims, params: Params, s: int) -> Tuple[int, int]:
    n, v = d["T"], d["V"]
    return n * v * s + 8 * n + FP32 * n, 2 * n * v * s + 8 * n + FP32 * n


def flce_bytes(d: Dims, params: Params, s: int) -> Tuple[int, int]:
    n, h, v = d["T"], d["H"], d["V"]
    operands = (n * h + v * h) * s
    return operands + 8 * n, 2 * operands


def nf4_dequantize_bytes(d: Dims, params: Params, s: int) -> Tuple[int, Optional[int]]:
    n = d["O"] * d["I"]
    blocks = -(-n // params["blocksize"])
    nested_blocks = -(-blocks // params["nested_blocksize"])
    # read the codes (n/2 uint8), 1 absmax code per block, fp32 nested scales, code tables, offset; write n*s
    reads = -(-n // 2) + blocks + FP32 * (nested_blocks + NF4_CODE_VALUES + NESTED_CODE_VALUES + 1)
    return reads + n * s, None
