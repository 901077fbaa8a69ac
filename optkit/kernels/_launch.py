"""Helpers shared by the row-wise and elementwise kernel files (rms_norm, rope, swiglu, geglu).

Three jobs, all host-side and cheap (results of the shape -> config functions are cached):
- shape -> launch config (block sizes, warps, persistent program count), with the reasoning once;
- tensors -> the layout the kernels accept (rows with unit last stride, flat contiguous buffers);
- the gated-MLP drop-in module shared by SwiGLU and GeGLU, which differ only in the activation.
"""

from __future__ import annotations

import functools

import torch
import triton
from torch import nn

# Elements one program keeps in registers. 4096 elements over 8 warps is 16 per thread: two 16-byte
# vector loads per bf16 tensor, with registers left for the fp32 math (the Triton layer-norm tutorial's
# heuristic also gives 8 warps to a 4096-wide row).
TILE_ELEMENTS = 4096
# Widest row a row kernel accepts (a row's reduction needs all of it in one tile): 64 values per
# thread at 32 warps. Correct up to here; past ~16 K columns expect register spills (not measured).
MAX_ROW_ELEMENTS = 65536
# Programs per SM for the persistent backward kernels. Each 8-warp program has one row block of x and
# dy in flight (16 KB at 4096 bf16 columns); Little's law wants ~15 KB per SM on an H100 (3.35 TB/s x
# ~600 ns / 132 SMs), so even 2 resident programs suffice, and 4 leaves room. The fp32 weight-gradient
# partials they write (programs x hidden x 4 bytes) stay ~2% of the backward's traffic at 16 K rows.
PROGRAMS_PER_SM = 4
# Under the CPU interpreter each program is a Python loop iteration: a few programs is enough to
# exercise the cross-program reduction without making tests slow.
INTERPRETER_PROGRAMS = 4


def warps_for(tile_elements: int) -> int:
    """16 elements per thread (32 threads per warp), between 1 and 32 warps."""
    return int(min(32, max(1, tile_elements // 512)))


# Bounded: row and element counts change with every packed batch.
@functools.lru_cache(maxsize=1024)
def row_tile_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N cols, num_warps) for a kernel that reduces over whole rows.

    A row is one tile (its reduction must see it all); short rows are stacked BLOCK_M to a program so
    each program still moves ~TILE_ELEMENTS elements instead of a few masked lanes.
    """
    if n_cols > MAX_ROW_ELEMENTS:
        raise ValueError(
            f"rows of {n_cols} elements exceed the {MAX_ROW_ELEMENTS} a program holds in registers; "
            "use the PyTorch reference (or split the last dimension) for such widths"
        )
    block_n = triton.next_power_of_2(max(n_cols, 1))
    block_m = max(1, min(TILE_ELEMENTS // block_n, triton.next_power_of_2(max(n_rows, 1))))
    return block_m, block_n, warps_for(block_m * block_n)


@functools.lru_cache(maxsize=1024)
def flat_tile_config(n_elements: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for an elementwise kernel over a flat buffer."""
    block = min(TILE_ELEMENTS, max(128, triton.next_power_of_2(max(n_elements, 1))))
    return block, warps_for(block)


@functools.cache
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(device: torch.device, n_blocks: int) -> int:
    """How many programs a grid-stride kernel launches on ``device`` for ``n_blocks`` of work."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        slots = PROGRAMS_PER_SM * _cuda_sm_count(index)
    else:
        slots = INTERPRETER_PROGRAMS
    return max(1, min(n_blocks, slots))


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a (rows, last_dim) matrix with unit column stride; copies only when a view can't be."""
    x2d = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2d.shape[-1] > 1 and x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    return x2d


def as_flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous 1-D buffer (copies a non-contiguous input once)."""
    return x.contiguous().view(-1)


def check_same_shape(op: str, **tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{op}: inputs must have the same shape, got {shapes}")


def check_float_dtype(op: str, **tensors: torch.Tensor) -> None:
    allowed = (torch.float32, torch.float16, torch.bfloat16)
    for name, t in tensors.items():
        if t.dtype not in allowed:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")


# Activation module class -> HF activation string, for MLPs built without a config attribute.
_ACTIVATION_CLASS_NAMES = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUTanh": "gelu_pytorch_tanh",
    "PytorchGELUTanh": "gelu_pytorch_tanh",
    "NewGELUActivation": "gelu_new",
    "GELUActivation": "gelu",
}


def hf_activation_name(hf_mlp: nn.Module) -> str | None:
    """The activation string of an HF MLP: its config's ``hidden_activation`` (Gemma) or ``hidden_act``,
    else read from the class of its ``act_fn``; None when neither says."""
    config = getattr(hf_mlp, "config", None)
    for key in ("hidden_activation", "hidden_act"):
        name = getattr(config, key, None)
        if isinstance(name, str):
            return name
    act_fn = getattr(hf_mlp, "act_fn", None)
    if isinstance(act_fn, nn.GELU):
        return "gelu_pytorch_tanh" if act_fn.approximate == "tanh" else "gelu"
    return _ACTIVATION_CLASS_NAMES.get(type(act_fn).__name__)


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` with the gated product as one fused op.

    Subclasses set ``gated_op``. The three projections are the very module objects of the HF MLP
    (possibly peft LoRA wrappers), so parameters are shared and state-dict keys are unchanged.
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj

    def gated_op(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gated_op(self.gate_proj(x), self.up_proj(x)))

    @staticmethod
    def projections_of(hf_mlp: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        missing = [n for n in ("gate_proj", "up_proj", "down_proj") if not hasattr(hf_mlp, n)]
        if missing:
            raise TypeError(
                f"{type(hf_mlp).__name__} has no {', '.join(missing)}; gated-MLP drop-ins replace "
                "Llama/Qwen/Mistral/Gemma-style MLPs with gate_proj, up_proj and down_proj"
            )
        return hf_mlp.gate_proj, hf_mlp.up_proj, hf_mlp.down_proj


def launch_gated_fwd(kernel, gate: torch.Tensor, up: torch.Tensor, **constexprs) -> torch.Tensor:
    """``out = act(gate) * up`` by an elementwise ``kernel(gate, up, out, n, ..., BLOCK)`` over flat buffers."""
    gate_flat, up_flat = as_flat(gate), as_flat(up)
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    n_elements = gate_flat.numel()
    if n_elements:
        block, num_warps = flat_tile_config(n_elements)
        kernel[(triton.cdiv(n_elements, block),)](
            gate_flat, up_flat, out, n_elements, **constexprs, BLOCK=block, num_warps=num_warps
        )
    return out


def launch_gated_bwd(
    kernel, d_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, **constexprs
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_gate, d_up)`` by ``kernel(d_out, gate, up, d_gate, d_up, n, ..., BLOCK)``, in gate's and up's dtypes."""
    d_out_flat, gate_flat, up_flat = as_flat(d_out), as_flat(gate), as_flat(up)
    d_gate, d_up = torch.empty_like(gate_flat), torch.empty_like(up_flat)
    n_elements = gate_flat.numel()
    if n_elements:
        block, num_warps = flat_tile_config(n_elements)
        kernel[(triton.cdiv(n_elements, block),)](
            d_out_flat, gate_flat, up_flat, d_gate, d_up, n_elements, **constexprs, BLOCK=block, num_warps=num_warps
        )
    return d_gate.view(gate.shape), d_up.view(up.shape)
