"""NF4 dequantization of a bitsandbytes 4-bit weight in one Triton kernel.

What is fused: bitsandbytes stores a QLoRA weight as packed 4-bit codes plus one scale ("absmax") per
block of ``blocksize`` weights; with double quantization (QLoRA's default) those scales are themselves
8-bit codes with one fp32 scale per ``nested_blocksize`` (256) of them and a global offset. bitsandbytes
dequantizes that in two kernels plus an add (8-bit absmax -> fp32 buffer, += offset, then 4-bit ->
weight). Here one kernel reads the packed codes and the 8-bit absmax codes and writes the weight; the
fp32 absmax buffer is never materialized.

Layout (bitsandbytes 0.4x-0.50, ``functional.quantize_4bit`` and its CUDA/CPU kernels):
- the weight of shape ``quant_state.shape`` is flattened row-major; element ``2i`` is the HIGH nibble
  of packed byte ``i`` and element ``2i+1`` the LOW nibble (an odd count pads the last low nibble);
- block ``b = element // blocksize`` has scale ``absmax[b]`` (fp32), or with double quantization
  ``nested_code[absmax_u8[b]] * nested_absmax[b // nested_blocksize] + offset`` (fp32, multiply then
  add, not fused);
- weight = ``code[nibble] * scale`` in fp32, rounded once to the output dtype (round to nearest even).

Bit-exactness: the kernel performs the same fp32 operations in the same order as bitsandbytes, so the
result equals ``bitsandbytes.functional.dequantize_4bit`` bit for bit. FMA contraction would fuse the
nested scale's multiply-add into one rounding (a last-bit difference from bitsandbytes), so the kernel
is compiled with ``enable_fp_fusion=False``; nothing else in it could contract.

Limits: NF4 only (FP4 raises), quant_storage of any dtype (viewed as bytes), blocksizes that are even
powers of two (bitsandbytes allows 32..4096). There is no backward: the quantized weight is frozen.

``NF4GroupDequantizer``: the weights of projections that read one input (Q, K, V; gate, up) into one
buffer by one launch of the same per-block code (``_dequantize_blocks``), for one GEMM over the group.

``nf4_quantize`` (beside the reference) writes the same layout without bitsandbytes, for weights optkit
quantizes itself (expert QLoRA): the dequantizers here read its ``NF4State`` as they read a QuantState.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from optkit.kernels._launch import flat_tile_config

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def _check_nf4(quant_state) -> None:
    if quant_state.quant_type != "nf4":
        raise ValueError(
            f"nf4_dequantize handles NF4 only, got quant_type={quant_state.quant_type!r}; "
            "use bitsandbytes.functional.dequantize_4bit for other 4-bit types"
        )
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError(
            "this weight was repacked by bitsandbytes' CPU inference path (Linear4bit forward in eval mode "
            "without grad); run the model in train mode, or re-quantize it, before dequantizing with optkit"
        )


def _as_bytes(weight_packed: torch.Tensor) -> torch.Tensor:
    """The packed codes as a flat uint8 buffer (bitsandbytes may store them in another dtype)."""
    flat = weight_packed.contiguous().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def reference_nf4_dequantize(weight_packed: torch.Tensor, quant_state) -> torch.Tensor:
    """Plain PyTorch NF4 dequantization, operation for operation what bitsandbytes computes."""
    _check_nf4(quant_state)
    packed = _as_bytes(weight_packed).to(torch.int64)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)  # high nibble first
    n = int(torch.Size(quant_state.shape).numel())
    values = quant_state.code.to(packed.device, torch.float32)[codes[:n]]
    block = torch.arange(n, device=packed.device) // quant_state.blocksize
    if quant_state.nested:
        nested = quant_state.state2
        scale = nested.code.float()[quant_state.absmax.to(torch.int64)]
        scale = scale * nested.absmax.float()[torch.arange(scale.numel(), device=scale.device) // nested.blocksize]
        scale = scale + quant_state.offset.float()
    else:
        scale = quant_state.absmax.float()
    return (values * scale[block]).to(quant_state.dtype).reshape(quant_state.shape)


# The NF4 codebook in code order 0..15 (QLoRA: quantiles of N(0, 1) scaled to [-1, 1]), the float32 values
# of bitsandbytes' get_4bit_type("nf4"), so optkit's codes and bitsandbytes' mean the same weights.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


@dataclass
class NF4State:
    """What the dequantizers here read of a bitsandbytes ``QuantState``, for weights optkit quantized itself
    (single-level: one fp32 absmax per block, no double quantization)."""

    shape: Tuple[int, ...]
    dtype: torch.dtype
    absmax: torch.Tensor  # fp32, one per block
    code: torch.Tensor  # fp32 (16,), NF4_CODE
    blocksize: int
    quant_type: str = "nf4"
    nested: bool = False


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64) -> Tuple[torch.Tensor, NF4State]:
    """NF4 blockwise quantization in bitsandbytes' layout: (packed uint8 codes, NF4State).

    The weight is flattened row-major and cut into blocks of ``blocksize`` (the last may be short); each
    element becomes the code nearest to ``element * (1 / block absmax)`` (a tie goes to the lower code, as
    in bitsandbytes). Plain PyTorch rather than a kernel: it runs once per frozen weight; blocks are done
    a chunk at a time so the fp32 temporaries stay small beside a large weight.
    """
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"nf4_quantize needs a power-of-two blocksize >= 2, got {blocksize}")
    flat = weight.detach().reshape(-1)
    n, device = flat.numel(), flat.device
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    midpoints = (code[:-1] + code[1:]) / 2
    n_blocks = -(-n // blocksize)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=device)
    codes = torch.full((n_blocks * blocksize + 1,), 7, dtype=torch.uint8, device=device)  # 7: code 0.0 pads
    chunk = max(1, (1 << 22) // blocksize)  # blocks per chunk: 4M elements
    for first in range(0, n_blocks, chunk):
        start, stop = first * blocksize, min(n, (first + chunk) * blocksize)
        part = flat[start:stop].float()
        part = torch.nn.functional.pad(part, (0, -part.numel() % blocksize)).view(-1, blocksize)
        block_absmax = part.abs().amax(dim=1)
        absmax[first : first + part.shape[0]] = block_absmax
        scaled = (part * (1.0 / block_absmax.clamp(min=1e-38))[:, None]).clamp(-1.0, 1.0)
        codes[start:stop] = torch.bucketize(scaled, midpoints).view(-1)[: stop - start].to(torch.uint8)
    codes = codes[: n + n % 2]  # an odd count pads the last low nibble
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, NF4State(tuple(weight.shape), weight.dtype, absmax, code, blocksize)


# Reads n/2 packed bytes, one absmax (u8 code, or fp32 without nesting) per `BLOCKSIZE` weights and one
# fp32 nested scale per NESTED_BLOCKSIZE blocks; writes n weights: ~n * (0.5 + out_bytes) bytes moved.
# A program owns BLOCK_ROWS whole quantization blocks: each scale is loaded once and broadcast.
@triton.jit
def _dequantize_blocks(
    program,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    out_ptr,
    n_bytes,
    n_out,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    HAS_NESTED: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2  # bytes per quantization block
    row = program.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # quantization block ids
    byte = row[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (BLOCK_ROWS, HALF)
    packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    row_mask = row * HALF < n_bytes
    if HAS_NESTED:
        absmax_code = tl.load(absmax_ptr + row, mask=row_mask, other=0).to(tl.int32)
        nested_scale = tl.load(nested_absmax_ptr + row // NESTED_BLOCKSIZE, mask=row_mask, other=0.0)
        scale = tl.load(nested_code_ptr + absmax_code) * nested_scale
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + row, mask=row_mask, other=0.0)
    high = tl.load(code_ptr + (packed >> 4)) * scale[:, None]
    low = tl.load(code_ptr + (packed & 0xF)) * scale[:, None]
    values = tl.interleave(high, low)  # (BLOCK_ROWS, BLOCKSIZE): element 2i <- high nibble of byte i
    out = row[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    if OUT_BF16:
        # Round to nearest even on the bits (out_ptr is the bf16 output viewed as int16): the GPU's
        # cvt.rn does the same, but Triton's CPU interpreter truncates, and tests run there.
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + out, bits.to(tl.int16), mask=out < n_out)
    else:
        tl.store(out_ptr + out, values.to(out_ptr.dtype.element_ty), mask=out < n_out)


@triton.jit
def _nf4_dequantize_kernel(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    out_ptr,
    n_bytes,
    n_out,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    HAS_NESTED: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    _dequantize_blocks(
        tl.program_id(0),
        packed_ptr,
        absmax_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        offset_ptr,
        code_ptr,
        out_ptr,
        n_bytes,
        n_out,
        BLOCKSIZE,
        NESTED_BLOCKSIZE,
        BLOCK_ROWS,
        HAS_NESTED,
        OUT_BF16,
    )


# Up to three weights in one launch (Q, K, V; gate, up), each read and written as by the kernel above:
# programs [0, programs_a) do weight a, the next programs_b weight b, the rest weight c. Each weight has
# its own pointers (its bytes, scales and output rows); a group of two passes b's arguments again as c's
# (the grid never reaches them). The byte count is the sum of the weights'.
@triton.jit
def _nf4_dequantize_group_kernel(
    packed_a, absmax_a, nested_absmax_a, nested_code_a, offset_a, code_a, out_a, n_bytes_a, n_out_a, programs_a,
    packed_b, absmax_b, nested_absmax_b, nested_code_b, offset_b, code_b, out_b, n_bytes_b, n_out_b, programs_b,
    packed_c, absmax_c, nested_absmax_c, nested_code_c, offset_c, code_c, out_c, n_bytes_c, n_out_c,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    HAS_NESTED: tl.constexpr,
    OUT_BF16: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    if program < programs_a:
        _dequantize_blocks(
            program, packed_a, absmax_a, nested_absmax_a, nested_code_a, offset_a, code_a, out_a, n_bytes_a,
            n_out_a, BLOCKSIZE, NESTED_BLOCKSIZE, BLOCK_ROWS, HAS_NESTED, OUT_BF16,
        )  # fmt: skip
    elif program < programs_a + programs_b:
        _dequantize_blocks(
            program - programs_a, packed_b, absmax_b, nested_absmax_b, nested_code_b, offset_b, code_b, out_b,
            n_bytes_b, n_out_b, BLOCKSIZE, NESTED_BLOCKSIZE, BLOCK_ROWS, HAS_NESTED, OUT_BF16,
        )  # fmt: skip
    else:
        _dequantize_blocks(
            program - programs_a - programs_b, packed_c, absmax_c, nested_absmax_c, nested_code_c, offset_c,
            code_c, out_c, n_bytes_c, n_out_c, BLOCKSIZE, NESTED_BLOCKSIZE, BLOCK_ROWS, HAS_NESTED, OUT_BF16,
        )  # fmt: skip


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _weight_args(packed, absmax, nested_absmax, nested_code, offset, code, out, n_out) -> tuple:
    """One weight's kernel arguments, packed bytes to element count; without nesting, tensors the kernel never
    reads stand in for the nested ones (a pointer argument cannot be None)."""
    nested = nested_absmax is not None
    return (
        packed,
        absmax,
        nested_absmax if nested else absmax,
        nested_code if nested else code,
        offset if nested else absmax,
        code,
        out.view(torch.int16) if out.dtype == torch.bfloat16 else out,
        packed.numel(),
        n_out,
    )


def _tiling(blocksize: int, n_out: int) -> Tuple[int, int]:
    """(quantization blocks per program, warps): ~4K output elements per program (the elementwise tile of
    _launch), in whole quantization blocks."""
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"nf4_dequantize needs a power-of-two blocksize >= 2, got {blocksize}")
    tile_elements, num_warps = flat_tile_config(n_out)
    return max(1, tile_elements // blocksize), num_warps


def _launch(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    code: torch.Tensor,
    blocksize: int,
    nested_blocksize: int,
    n_out: int,
    out: torch.Tensor,
) -> None:
    block_rows, num_warps = _tiling(blocksize, n_out)
    grid = (triton.cdiv(triton.cdiv(n_out, blocksize), block_rows),)
    has_nested = nested_absmax is not None
    _nf4_dequantize_kernel[grid](
        *_weight_args(packed, absmax, nested_absmax, nested_code, offset, code, out, n_out),
        BLOCKSIZE=blocksize,
        NESTED_BLOCKSIZE=nested_blocksize if has_nested else 1,
        BLOCK_ROWS=block_rows,
        HAS_NESTED=has_nested,
        OUT_BF16=out.dtype == torch.bfloat16,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )


def _launch_group(parts: Sequence[tuple], n_outs: Sequence[int], outs: Sequence[torch.Tensor]) -> None:
    """Two or three weights of one quantization layout (``NF4Dequantizer.args`` each) in one launch, weight i
    into ``outs[i]`` (contiguous, one dtype)."""
    blocksize, nested_blocksize = parts[0][6], parts[0][7]
    has_nested = parts[0][2] is not None
    block_rows, num_warps = _tiling(blocksize, max(n_outs))
    programs = [triton.cdiv(triton.cdiv(n, blocksize), block_rows) for n in n_outs]
    weights = [_weight_args(*part[:6], out, n) for part, out, n in zip(parts, outs, n_outs)]
    third = weights[2] if len(weights) == 3 else weights[1]  # never reached with two: the grid ends before it
    _nf4_dequantize_group_kernel[(sum(programs),)](
        *weights[0],
        programs[0],
        *weights[1],
        programs[1],
        *third,
        BLOCKSIZE=blocksize,
        NESTED_BLOCKSIZE=nested_blocksize if has_nested else 1,
        BLOCK_ROWS=block_rows,
        HAS_NESTED=has_nested,
        OUT_BF16=outs[0].dtype == torch.bfloat16,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )


def _nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    code: torch.Tensor,
    blocksize: int,
    nested_blocksize: int,
    shape: Sequence[int],
    dtype_code: int,
) -> torch.Tensor:
    out = torch.empty(shape, dtype=_CODE_DTYPES[dtype_code], device=packed.device)
    _launch(packed, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, out.numel(), out)
    return out


# Forward only (the weight is frozen), so no _dispatch.autograd_op pair. Eager calls launch straight into
# out=; compiled calls go through this op, which returns a new tensor that is then copied into out=.
_nf4_dequantize_op = torch.library.custom_op("optkit::nf4_dequantize", _nf4_dequantize, mutates_args=())


@_nf4_dequantize_op.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, shape, dtype_code):
    return packed.new_empty(shape, dtype=_CODE_DTYPES[dtype_code])


class NF4Dequantizer:
    """One NF4 weight's dequantization, prepared once and run many times (fused LoRA: 3 times a step).

    Everything ``nf4_dequantize`` derives per call (the packed bytes as a plain uint8 tensor, the nested
    state's pieces, the float offset, the launch arguments) is derived here once, so a call is the launch
    and nothing else: that host time is paid per projection per pass, hundreds of times a step.
    ``is_for(weight, quant_state)`` says whether the preparation still describes that weight (moving the
    model re-creates the tensors); callers rebuild the dequantizer when it does not.
    """

    def __init__(self, weight_packed: torch.Tensor, quant_state):
        _check_nf4(quant_state)
        self.quant_state, self.absmax = quant_state, quant_state.absmax
        compiling = torch.compiler.is_compiling()  # Dynamo traces neither .data nor data_ptr(); nothing is reused there
        data = weight_packed.data if isinstance(weight_packed, torch.nn.Parameter) and not compiling else weight_packed
        self.data_ptr = None if compiling else data.data_ptr()
        self.packed = _as_bytes(data)  # a plain tensor: no Params4bit __torch_function__ on every call
        nested = quant_state.state2 if quant_state.nested else None
        self.args = (
            self.packed,
            quant_state.absmax,
            nested.absmax if nested is not None else None,
            nested.code if nested is not None else None,
            quant_state.offset.reshape(1).float() if nested is not None else None,
            quant_state.code,
            int(quant_state.blocksize),
            int(nested.blocksize) if nested is not None else 1,
        )
        self.shape = tuple(quant_state.shape)
        self.n_out = int(torch.Size(self.shape).numel())
        self.triton = _use_triton(self.packed.device)
        self.weight_packed = weight_packed

    def is_for(self, weight_packed: torch.Tensor, quant_state) -> bool:
        return (
            quant_state is self.quant_state
            and quant_state.absmax is self.absmax
            and weight_packed.data_ptr() == self.data_ptr
        )

    def __call__(self, dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight in ``dtype``; written into ``out`` (contiguous, the weight's shape) when given."""
        if out is not None and (tuple(out.shape) != self.shape or out.dtype != dtype or not out.is_contiguous()):
            raise ValueError(
                f"nf4 dequantize out= must be a contiguous {dtype} tensor of shape {self.shape}, "
                f"got {out.dtype} {tuple(out.shape)}"
            )
        if not self.triton:
            result = reference_nf4_dequantize(self.weight_packed, self.quant_state).to(dtype)
            return result if out is None else out.copy_(result)
        if torch.compiler.is_compiling():  # the op is opaque to Dynamo and has a fake implementation
            result = _nf4_dequantize_op(*self.args, list(self.shape), _DTYPE_CODES[dtype])
            return result if out is None else out.copy_(result)
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self.packed.device)
        _launch(*self.args, self.n_out, out)
        return out


class NF4GroupDequantizer:
    """Several NF4 weights of one width dequantized into one ``(sum of rows, width)`` buffer, each weight's rows
    after the previous one's, by ONE kernel launch (up to three weights per launch: Q, K, V or gate, up).

    For projections that read one input (optkit.opt.grouped_base_gemm): their base GEMM then runs once over
    the buffer. Each weight keeps its own packed bytes and scales (nothing is concatenated or copied); the
    launch takes every weight's pointers. Its values equal each weight's ``NF4Dequantizer`` bit for bit (the
    same per-block code in the same order). Weights of different quantization layouts (blocksize, nesting),
    more than three weights, a CPU without the Triton interpreter and torch.compile go weight by weight into
    the same buffer instead (``NF4Dequantizer(out=)``: same values, one launch per weight).
    """

    def __init__(self, weights: Sequence[Tuple[torch.Tensor, object]]):
        self.parts = [NF4Dequantizer(packed, quant_state) for packed, quant_state in weights]
        widths = {part.shape[1:] for part in self.parts}
        if any(len(part.shape) != 2 for part in self.parts) or len(widths) != 1:
            shapes = [part.shape for part in self.parts]
            raise ValueError(f"NF4GroupDequantizer stacks 2-D weights of one width, got shapes {shapes}")
        self.rows = [part.shape[0] for part in self.parts]
        self.shape = (sum(self.rows), self.parts[0].shape[1])
        layouts = {(part.args[6], part.args[7], part.args[2] is not None) for part in self.parts}
        self.one_launch = len(layouts) == 1 and 2 <= len(self.parts) <= 3 and self.parts[0].triton

    def is_for(self, weights: Sequence[Tuple[torch.Tensor, object]]) -> bool:
        return len(weights) == len(self.parts) and all(
            part.is_for(packed, quant_state) for part, (packed, quant_state) in zip(self.parts, weights)
        )

    def __call__(self, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=dtype, device=self.parts[0].packed.device)
        slices = out.split(self.rows)  # row blocks of a contiguous buffer: each contiguous
        if self.one_launch and not torch.compiler.is_compiling():
            _launch_group([part.args for part in self.parts], [part.n_out for part in self.parts], slices)
        else:
            for part, rows in zip(self.parts, slices):
                part(dtype, out=rows)
        return out


def nf4_dequantize(
    weight_packed: torch.Tensor, quant_state, dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Dequantize a bitsandbytes NF4 weight (``Params4bit`` data + its ``QuantState``) in one kernel.

    Returns a tensor of ``quant_state.shape`` in ``dtype`` (default ``quant_state.dtype``), equal bit for
    bit to ``bitsandbytes.functional.dequantize_4bit(weight_packed, quant_state)``; with ``out`` (a
    contiguous tensor of that shape and dtype, e.g. rows of a larger buffer) it is written there. On a CPU
    tensor without the Triton interpreter it runs the PyTorch reference instead. Repeated calls on one
    weight: prepare an ``NF4Dequantizer`` once instead.
    """
    dtype = dtype or quant_state.dtype
    if dtype not in _DTYPE_CODES:
        raise TypeError(f"nf4_dequantize writes float32, float16 or bfloat16, not {dtype}")
    return NF4Dequantizer(weight_packed, quant_state)(dtype, out)
