"""Sort-based MoE expert execution for HF Qwen3-MoE (opt.moe_sorted_routing), expert LoRA and NF4 expert weights.

HF's default expert loop (``experts_implementation=eager``) visits every hit expert: a ``nonzero`` to find the hit
experts plus one ``torch.where`` per expert - one device->host sync per expert per layer - and ~10 small kernels each.
Here the routing HF's own router produced (softmax, top-k, norm_topk_prob: the router module is left untouched, so
routing is identical by construction) is executed as:
  one stable argsort of the flattened (token, k) -> expert assignments; per-expert counts (a bincount done as a
  scatter_add, because CUDA's bincount reads the max back to the host) and their cumsum = group offsets;
  one gather of the token rows in expert order; one grouped GEMM per projection (gate_up, down) with the activation
  between; one gather back to (token, k) order and a (1 x k) @ (k x H) batched matmul that applies the router weights
  and sums the k expert outputs of each token (deterministic, fp32-accumulated, unlike an atomic index_add).
The grouped GEMM is ``torch._grouped_mm`` (or its public ``F.grouped_mm``) on CUDA for bf16 on sm80+ (autograd is
torch's); elsewhere (CPU, fp32) a loop over each expert's contiguous row slice, which needs the offsets on the host:
one sync per forward instead of one per expert. Without per-expert syncs the whole MoE forward is sync-free on GPU.
No Triton grouped GEMM is shipped (optkit/kernels/moe_grouped_gemm.py does not exist): grouped_mm covers H100/H200.

Layouts: HF v5 stores experts as 3D tensors, ``gate_up_proj`` (E, 2I, H) = [gate; up] concatenated and ``down_proj``
(E, H, I), in 5.17 and 5.24 alike; a transposed layout (``is_transposed`` / ``experts_are_transposed``: (E, H, 2I),
(E, I, H)) is read too. Interleaved gate/up and transformers-4 ModuleList experts are refused with a message.

Expert LoRA (train.method lora/qlora with "experts" in train.lora_targets): per expert low-rank adapters
A (E, r, in) and B (E, out, r), B = 0 at start, output += (alpha / r) * (x A_e^T) B_e^T, computed with the same
grouped GEMMs inside this path. The adapters are parameters of the swapped module (names ``gate_up_lora_A`` ...), in
the base weight's dtype. QLoRA: the frozen expert weights are stored NF4 (bitsandbytes' blockwise 4-bit layout,
quantized and dequantized by optkit's own NF4 code, no bitsandbytes call) and dequantized per projection in forward
and again in backward (never kept alive between them).

Everything is per model instance: each HF experts module is swapped for a ``SortedExperts`` sharing its parameters
(state-dict keys unchanged); the originals are kept so ``remove_moe_sorted_routing`` restores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("gate_up_proj", "down_proj")


@dataclass
class ExpertRouting:
    """Where each (token, k) slot goes, in expert-sorted order (S = tokens * k)."""

    token_of_slot: torch.Tensor  # (S,) int64: source token row of each expert-sorted slot
    inverse: torch.Tensor  # (S,) int64: sorted position of each slot in (token, k) order
    offsets: torch.Tensor  # (E,) int32: cumulative row counts per expert (grouped_mm's `offs`)
    _host_offsets: Optional[Tuple[int, ...]] = None

    def host_offsets(self) -> Tuple[int, ...]:
        """The offsets as host ints for the slice-loop GEMM: one device->host read per forward, shared by all GEMMs."""
        if self._host_offsets is None:
            self._host_offsets = tuple(self.offsets.to("cpu", copy=True).tolist())
        return self._host_offsets


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int) -> ExpertRouting:
    """argsort + counts + offsets for top_k_index (T, k); no host sync."""
    top_k = top_k_index.shape[1]
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device)
    counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids))
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return ExpertRouting(order // top_k, inverse, counts.cumsum(0).to(torch.int32))


def _grouped_mm_op():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch's grouped GEMM: CUDA, bf16, sm80+ (sm90 only before torch 2.9), rows 16-byte aligned."""
    if not (x.is_cuda and x.dtype == weight.dtype == torch.bfloat16 and _grouped_mm_op() is not None):
        return False
    major, _ = torch.cuda.get_device_capability(x.device)
    torch_major_minor = tuple(int(p) for p in torch.__version__.split(".")[:2])
    if major < 8 or (torch_major_minor < (2, 9) and major != 9):
        return False
    return x.shape[-1] % 8 == 0 and weight.shape[-2] % 8 == 0 and weight.shape[-1] % 8 == 0


def grouped_linear(x: torch.Tensor, weight_out_in: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
    """x (S, in) in expert-sorted order, weight (E, out, in): row block of expert e times weight[e]^T -> (S, out)."""
    if grouped_mm_usable(x, weight_out_in):
        return _grouped_mm_op()(x, weight_out_in.transpose(-2, -1), offs=routing.offsets)
    pieces, start = [], 0
    for expert, end in enumerate(routing.host_offsets()):
        if end > start:
            pieces.append(x[start:end] @ weight_out_in[expert].transpose(0, 1))
        start = end
    if not pieces:
        return x.new_zeros(x.shape[0], weight_out_in.shape[1])
    return torch.cat(pieces)


def reference_moe_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn):
    """Plain per-token reference (what the tests trust): sum_k w_tk * down_e(act(gate_e(x)) * up_e(x))."""
    out = torch.zeros_like(hidden_states)
    for k in range(top_k_index.shape[1]):
        experts = top_k_index[:, k]
        gate_up = torch.einsum("th,toh->to", hidden_states, gate_up_proj[experts])
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch.einsum("ti,thi->th", act_fn(gate) * up, down_proj[experts])
        out = out + top_k_weights[:, k, None].to(y.dtype) * y
    return out


class _NF4ExpertWeight(torch.autograd.Function):
    """Grouped linear on an NF4 expert weight: dequantized in forward and again in backward, never saved (frozen)."""

    @staticmethod
    def forward(ctx, x, quantized, routing):
        ctx.quantized, ctx.routing = quantized, routing
        return grouped_linear(x, quantized.dequantize(), routing)

    @staticmethod
    def backward(ctx, grad_out):
        weight = ctx.quantized.dequantize()  # (E, out, in)
        return grouped_linear(grad_out, weight.transpose(-2, -1), ctx.routing), None, None


class NF4ExpertWeight:
    """A frozen (E, out, in) expert weight stored as NF4 (blockwise 4-bit, one fp32 absmax per 64 weights).

    Quantized and dequantized by optkit's NF4 code, not bitsandbytes': bitsandbytes 0.50's CPU dequantize_4bit
    is wrong when a row is not a whole number of blocks (e.g. (256, 32), (64, 96) with blocksize 64), which
    an expert's (E * out, in) weight often is; optkit's matches the original weights on every shape.
    """

    def __init__(self, weight_out_in: torch.Tensor, blocksize: int = 64):
        from optkit.kernels.nf4_dequantize import nf4_quantize

        self.shape, self.dtype = tuple(weight_out_in.shape), weight_out_in.dtype
        self.packed, self.state = nf4_quantize(weight_out_in, blocksize)

    def dequantize(self) -> torch.Tensor:
        from optkit.kernels.nf4_dequantize import nf4_dequantize

        return nf4_dequantize(self.packed, self.state, dtype=self.dtype)

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.state.absmax.numel() * 4


class SortedExperts(nn.Module):
    """Drop-in for HF's Qwen3MoeExperts: forward(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        if getattr(experts, "is_concatenated", True) is False:
            raise NotImplementedError(
                f"{type(experts).__name__} stores gate/up interleaved; moe_sorted_routing "
                "supports the concatenated [gate; up] layout only"
            )
        self.num_experts = experts.gate_up_proj.shape[0]
        self.transposed = bool(
            getattr(experts, "is_transposed", False) or getattr(experts, "experts_are_transposed", False)
        )
        self.gate_up_proj = experts.gate_up_proj  # the same Parameter objects: state-dict keys are unchanged
        self.down_proj = experts.down_proj
        self.act_fn = experts.act_fn
        self.lora_scale = 0.0
        self.quantized: Dict[str, NF4ExpertWeight] = {}

    def weight_out_in(self, name: str) -> torch.Tensor:
        weight = getattr(self, name)
        return weight.transpose(-2, -1) if self.transposed else weight

    def forward(self, hidden_states, top_k_index, top_k_weights):
        tokens, hidden = hidden_states.shape
        routing = sort_by_expert(top_k_index, self.num_experts)
        x = hidden_states.index_select(0, routing.token_of_slot)  # (S, H); backward is an index_add
        gate, up = self._project(x, "gate_up_proj", routing).chunk(2, dim=-1)  # (S, I) each
        y = self._project(self.act_fn(gate) * up, "down_proj", routing)  # (S, H)
        y = y.index_select(0, routing.inverse).view(tokens, -1, hidden)  # (T, k, H) in token order
        return torch.bmm(top_k_weights.to(y.dtype).unsqueeze(1), y).squeeze(1)  # weighted sum over k

    def _project(self, x: torch.Tensor, name: str, routing: ExpertRouting) -> torch.Tensor:
        if name in self.quantized:
            out = _NF4ExpertWeight.apply(x, self.quantized[name], routing)
        else:
            out = grouped_linear(x, self.weight_out_in(name), routing)
        lora_a = getattr(self, f"{name.replace('_proj', '')}_lora_A", None)
        if lora_a is None:
            return out
        lora_b = getattr(self, f"{name.replace('_proj', '')}_lora_B")
        low_rank = grouped_linear(grouped_linear(x, lora_a, routing), lora_b, routing)  # (S, r) -> (S, out)
        return out + self.lora_scale * low_rank

    def add_lora(self, rank: int, alpha: float) -> None:
        """Adapters A (E, r, in), B (E, out, r) per projection; B = 0 so the model starts unchanged."""
        for name in PROJECTIONS:
            (experts, out_dim, in_dim), dtype, device = self._weight_info(name)
            a = torch.empty(experts, rank, in_dim, dtype=dtype, device=device)
            bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's (and peft's) default init of A, per expert
            nn.init.uniform_(a, -bound, bound)
            prefix = name.replace("_proj", "")
            setattr(self, f"{prefix}_lora_A", nn.Parameter(a))
            setattr(
                self, f"{prefix}_lora_B", nn.Parameter(torch.zeros(experts, out_dim, rank, dtype=dtype, device=device))
            )
        self.lora_scale = alpha / rank

    def _weight_info(self, name: str):
        """((E, out, in), dtype, device) of a projection, dense or NF4."""
        if name in self.quantized:
            q = self.quantized[name]
            return q.shape, q.dtype, q.packed.device
        weight = self.weight_out_in(name)
        return tuple(weight.shape), weight.dtype, weight.device

    def quantize_nf4(self) -> int:
        """Store the frozen expert weights as NF4 (drops the dense Parameters); returns bytes now held."""
        total = 0
        for name in PROJECTIONS:
            self.quantized[name] = NF4ExpertWeight(self.weight_out_in(name))
            total += self.quantized[name].nbytes()
            delattr(self, name)
            setattr(self, name, None)  # keep the attribute, so code reading experts.gate_up_proj sees "no dense weight"
        return total


# --- expert LoRA and the swap it shares with opt.moe_sorted_routing -----------------------------------------------


def add_expert_lora(model, rank: int, alpha: float, quantize: bool = False) -> List[str]:
    """Adapters on every expert projection (swaps in SortedExperts first: the adapters live in its grouped path)."""
    swap_experts(model)
    modules = [m for m in model.modules() if isinstance(m, SortedExperts)]
    if not modules:
        return ["expert LoRA: no MoE experts in this model; nothing changed"]
    nf4_bytes = 0
    if quantize:  # one-way: the originals still hold the dense weights, and keeping them would undo the saving
        model.__dict__.get("_optkit_moe_originals", {}).clear()
    for module in modules:
        for name in PROJECTIONS:
            weight = getattr(module, name)
            if weight is not None:
                weight.requires_grad_(False)
        if quantize:
            nf4_bytes += module.quantize_nf4()
        module.add_lora(rank, alpha)
    log = [f"expert LoRA: r={rank} alpha={alpha} on gate_up_proj and down_proj of {len(modules)} experts modules"]
    if quantize:
        log.append(f"expert QLoRA: expert weights stored NF4 ({nf4_bytes / 2**20:.1f} MiB)")
    return log


def swap_experts(model) -> List[str]:
    originals = model.__dict__.setdefault("_optkit_moe_originals", {})  # a plain dict: not registered as submodules
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.ModuleList) and name.endswith(".experts"):
            raise NotImplementedError(
                f"{name} is a ModuleList of expert MLPs (transformers 4 layout); "
                "moe_sorted_routing needs transformers >= 5 (3D gate_up_proj / down_proj)"
            )
        if not _is_hf_3d_experts(module):
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, SortedExperts(module))
        originals[name] = module
        swapped.append(name)
    return swapped


def _is_hf_3d_experts(module: nn.Module) -> bool:
    if isinstance(module, SortedExperts):
        return False
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3
