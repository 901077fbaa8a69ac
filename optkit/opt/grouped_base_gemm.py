"""opt.fused_lora_grouped_gemm: the frozen base GEMM of projections that read one input (Q, K, V; gate, up)
as ONE GEMM in forward and one in backward, inside fused LoRA's Functions (optkit.opt.fused_lora).

The weights, one (sum out, in) operand per group:
- QLoRA (bitsandbytes NF4): ``NF4GroupDequantizer`` writes every weight of the group into one buffer with one
  kernel launch (each weight's packed bytes read where they are), in forward and again in backward. The
  group's dequantized weights then live together for one GEMM: Llama-3-8B gate/up is 235 MB at once where
  the per-projection path held 117 MB at a time (peak memory +117 MB, for one GEMM instead of two).
- bf16/fp32 weights are re-homed once, at patch time, as consecutive row blocks of one buffer (each parameter keeps
  its object, name and values; the old storages are freed: no extra memory), so the group's operand is a view.
  Concatenating per call instead would copy sum(out) x in per pass (Llama-3-8B QKV in bf16: 50 MB read and written
  per layer, three passes a step), which costs as much as the GEMM's own reads of the weights; re-homing costs
  nothing per call. What re-homing means elsewhere: ``model.state_dict()`` has the same keys and values (views;
  torch.save stores the shared storage once); peft's ``save_pretrained`` writes adapters only (untouched); HF
  ``save_pretrained`` works: transformers clones tensors that share a storage without overlapping before safetensors
  writes them, so the file is right but the save holds a copy of every grouped weight at once (~9 GB for Llama-3-8B
  in bf16: unpatch first where memory is short), and safetensors' own ``save_file`` (0.8) takes such disjoint views
  as they are; ``unpatch`` gives every weight its own storage back; a model moved after patching (``.to``,
  ``.cuda``, ``.half``: each parameter copied on its own) is re-homed on its first grouped call (the same parameter
  objects, held by weak reference); FSDP2 shards each parameter into its own DTensor and gathers each into its own
  buffer, so there a bf16 group runs one GEMM per projection and says so once in a warning (NF4 groups keep one
  dequantize and one GEMM). Under torch.compile every group takes the per-projection path (the buffer checks read
  data pointers, which Dynamo does not trace).

Forward: groups of unequal widths (GQA's Q vs K/V) run one 2-D GEMM (N, sum out); each output is a column
slice of it (row stride sum out), handed out as a tensor of its own over that memory rather than an
autograd view (``_separate``: views of one base share a version counter, so an in-place RoPE on q and k
would mark v as modified, and autograd refuses views of a split after that). Their readers take such
strides without a copy: HF's attention only ``view``s and ``transpose``s them, optkit's in-place RoPE
walks any strides of (B, H, S) and SDPA any strides with a unit last one. The one copy: Qwen3's
q_norm/k_norm under opt.kernels.rms_norm, whose ``as_rows`` cannot merge (S, H) at row stride sum out and
copies q and k (Qwen3-8B, 4096 tokens: ~84 MB read and written, ~30 us a layer, in forward, recompute and
backward; a row walk over (token, head) strides in that kernel would remove it); HF's own norm upcasts
into a new tensor anyway. Groups of equal widths (gate/up; MHA's Q, K, V) run one batched GEMM (x
broadcast, batch stride 0) into a (G, N, out) buffer, so each output is contiguous: the gated activation
kernels read flat buffers and would copy column halves (N x intermediate each, three times a step).

Backward dx = sum_i dy_i W_i: the grads arrive as separate tensors. Concatenated into one (N, sum out)
buffer, dx is one GEMM; that copy reads and writes 2 N sum(out) bytes per element size, while
accumulating per projection re-reads and rewrites dx (N x in) once per extra projection and runs GEMMs
of smaller K. So a group concatenates when sum(out) <= (G - 1) x in: Llama-3-8B QKV (6144 <= 8192;
4096 tokens: 50 MB in and out, ~35 us a layer, against 64 MB x 2 plus two K=1024 GEMMs); gate/up
accumulates two GEMMs over the one weight buffer (a cat would move 470 MB to save one 64 MB dx pass).
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optkit.opt.edits import note_once
from optkit.opt.fused_lora import FusedMLPForward, FusedProjectionForward
from optkit.opt.lora_projection import LoRAProjection

NAME = "fused_lora_grouped_gemm"
# The groups installed on each model, for unapply (weakly keyed: a dropped model takes its groups along).
_GROUPS: "weakref.WeakKeyDictionary[nn.Module, List[GroupedBase]]" = weakref.WeakKeyDictionary()


def _shape(projection: LoRAProjection) -> Tuple[int, ...]:
    quantized = projection.quantized()
    return tuple(quantized[1].shape) if quantized is not None else tuple(projection.base.weight.shape)


def stacked(weights: Sequence[Tensor]) -> Optional[Tensor]:
    """The weights as one (sum out, in) tensor when they are consecutive contiguous row blocks of one
    storage, else None."""
    first = weights[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for w in weights:
        if (
            w.dim() != 2
            or not w.is_contiguous()
            or (w.dtype, w.device, w.shape[1]) != (first.dtype, first.device, first.shape[1])
            or w.untyped_storage().data_ptr() != storage
            or w.storage_offset() != offset
        ):
            return None
        offset += w.numel()
    rows = sum(w.shape[0] for w in weights)
    return first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1), first.storage_offset())


def _rehome(weights: Sequence[Tensor]) -> None:
    """Give ``weights`` (same dtype, device and width) consecutive row blocks of one new buffer, in place."""
    first = weights[0]
    with torch.no_grad(), torch.inference_mode(False):
        buffer = torch.empty((sum(w.shape[0] for w in weights), first.shape[1]), dtype=first.dtype, device=first.device)
        for w, rows in zip(weights, buffer.split([w.shape[0] for w in weights])):
            rows.copy_(w)
            w.data = rows


def _owns_storage(weight: Tensor) -> bool:
    return weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()


def _separate(y: Tensor, parts: Sequence[Tensor]) -> List[Tensor]:
    """Tensors over ``parts`` (disjoint slices of ``y``) that autograd sees as unrelated tensors, not as views
    of one base: views share one version counter, so HF's in-place RoPE on q and k (optkit's kernel) would
    mark v modified too, and autograd refuses to use a view of a multi-view split after such a write."""
    storage = y.untyped_storage()
    return [y.new_empty(0).set_(storage, part.storage_offset(), part.shape, part.stride()) for part in parts]


class GroupedBase:
    """The frozen base weights of projections that read one input, multiplied as one GEMM (module docstring).

    ``forward`` / ``input_grad`` return None when the group cannot run as one here (the caller then runs
    one GEMM per projection); ``cat_grads`` picks backward's form (tests set it to reach both)."""

    def __init__(self, names: Sequence[str], projections: Sequence[LoRAProjection], note: Callable[[str], None]):
        self.label = "/".join(names)
        self.members = tuple(projections)
        shapes = [_shape(p) for p in self.members]
        self.outs = tuple(shape[0] for shape in shapes)
        self.in_features = shapes[0][1]
        self.batched = len(set(self.outs)) == 1
        self.cat_grads = sum(self.outs) <= (len(self.outs) - 1) * self.in_features
        self.quantized = self.members[0].quantized() is not None
        self._weights = [] if self.quantized else [weakref.ref(p.base.weight) for p in self.members]
        self._dequantizer = None
        self._note = note

    def serves(self, projections: Sequence[LoRAProjection]) -> bool:
        return len(projections) == len(self.members) and all(a is b for a, b in zip(projections, self.members))

    def attach(self) -> None:
        if not self.quantized:
            _rehome([p.base.weight for p in self.members])
        for p in self.members:
            p.grouped = self

    def release(self) -> None:
        """Detach from the projections; every weight this group re-homed gets a storage of its own again."""
        for p in self.members:
            p.grouped = None
        with torch.no_grad(), torch.inference_mode(False):
            for ref in self._weights:
                weight = ref()
                if weight is not None and not _owns_storage(weight):
                    weight.data = weight.data.clone()

    # ---- the operand
    def weight(self, dtype: torch.dtype) -> Optional[Tensor]:
        """The group's (sum out, in) weight in ``dtype``, or None."""
        if torch.compiler.is_compiling():
            return None
        weight = self._nf4(dtype) if self.quantized else self._dense()
        return weight if weight is None or weight.dtype == dtype else weight.to(dtype)

    def _nf4(self, dtype: torch.dtype) -> Optional[Tensor]:
        from optkit.kernels.nf4_dequantize import NF4GroupDequantizer

        sources = [p.quantized() for p in self.members]
        if self._dequantizer is None or not self._dequantizer.is_for(sources):
            self._dequantizer = NF4GroupDequantizer(sources)
        return self._dequantizer(dtype)

    def _dense(self) -> Optional[Tensor]:
        weights = [p.base.weight for p in self.members]
        weight = stacked(weights)
        if weight is not None:
            return weight
        owned = all(ref() is w for ref, w in zip(self._weights, weights))
        if owned and not torch.is_inference_mode_enabled():  # moved since patching: each parameter copied alone
            _rehome(weights)
            return stacked(weights)
        if not owned:
            self._note(
                f"{self.label} base weights are not one buffer here (FSDP2 gathers each parameter into its own, "
                "or they were replaced after patching): one GEMM per projection for them (4-bit groups unaffected)"
            )
        return None

    def _bias(self, dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
        biases = [p.bias(dtype) for p in self.members]
        if all(b is None for b in biases):
            return None
        return torch.cat(
            [torch.zeros(o, dtype=dtype, device=device) if b is None else b for b, o in zip(biases, self.outs)]
        )

    # ---- the GEMMs
    def forward(self, x: Tensor) -> Optional[List[Tensor]]:
        """x W^T + b for every member from one GEMM: column views (unequal widths) or contiguous slices."""
        weight = self.weight(x.dtype)
        if weight is None:
            return None
        bias = self._bias(x.dtype, x.device)
        if not self.batched:
            y = F.linear(x, weight, bias)
            return _separate(y, y.split(self.outs, dim=1))
        count, out = len(self.outs), self.outs[0]
        x3, w3 = x.expand(count, *x.shape), weight.view(count, out, -1).transpose(1, 2)
        y = torch.bmm(x3, w3) if bias is None else torch.baddbmm(bias.view(count, 1, out), x3, w3)
        return _separate(y, y.unbind(0))

    def input_grad(self, grads: Sequence[Tensor]) -> Optional[Tensor]:
        """sum_i dy_i W_i: one GEMM over the concatenated grads, or one per member accumulated."""
        weight = self.weight(grads[0].dtype)
        if weight is None:
            return None
        if self.cat_grads:
            return torch.cat(list(grads), dim=1) @ weight
        dx = None
        for dy, w in zip(grads, weight.split(self.outs)):
            dx = dy @ w if dx is None else dx.addmm_(dy, w)
        return dx


# ----------------------------------------------------------------------------- installing
def _input_sharing_groups(model: nn.Module) -> Iterator[Tuple[str, Tuple[str, ...], Tuple[LoRAProjection, ...]]]:
    """(kind, names, projections) of every fused group whose projections read one input."""
    seen = set()
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, FusedProjectionForward):
            group = forward.shared.group
            if id(group) not in seen and len(group.projections) > 1:
                seen.add(id(group))
                yield "QKV", group.names, group.projections
        elif isinstance(forward, FusedMLPForward):
            yield "gate/up", ("gate_proj", "up_proj"), forward.group.gate_up


def _why_not(projections: Sequence[LoRAProjection]) -> Optional[str]:
    """Why these projections cannot share one base GEMM, or None."""
    if any(p.grouped is not None for p in projections):
        return "already grouped"
    sources = [p.quantized() for p in projections]
    if any(s is not None for s in sources):
        if any(s is None or s[1].quant_type != "nf4" for s in sources):
            return "not all base weights are NF4 (the grouped dequantize is NF4's; FP4 and mixed groups are not)"
        if len({tuple(s[1].shape[1:]) for s in sources}) != 1:
            return "base weights of different widths"
        return None
    weights = [p.base.weight for p in projections]
    if len({(w.dtype, w.device, w.dim(), w.shape[-1]) for w in weights}) != 1:
        return "base weights of different dtypes, devices or widths"
    if not all(w.is_contiguous() and _owns_storage(w) for w in weights):
        return "a base weight shares its storage with another tensor (re-homing it would untie them)"
    return None


def apply_grouped_base_gemm(model: nn.Module, opt_cfg) -> List[str]:
    """Group the base GEMMs of fused LoRA's Q/K/V and gate/up projections; returns the log."""
    if not getattr(opt_cfg, "fused_lora", False):
        return ["skipped (it groups fused LoRA's GEMMs: needs opt.fused_lora=true)"]
    note = note_once(model, NAME)
    counts: Dict[str, List[int]] = {"QKV": [0, 0], "gate/up": [0, 0]}
    skipped: Dict[str, int] = {}
    groups = _GROUPS.setdefault(model, [])
    for kind, names, projections in _input_sharing_groups(model):
        counts[kind][1] += 1
        reason = _why_not(projections)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        group = GroupedBase(names, projections, note)
        group.attach()
        groups.append(group)
        counts[kind][0] += 1
    weights = sorted(
        {"NF4, one dequantize launch each" if g.quantized else "weights re-homed into one buffer each" for g in groups}
    )
    (qkv, qkv_all), (gate_up, gate_up_all) = counts["QKV"], counts["gate/up"]
    log = [f"{NAME}: one base GEMM per group for {qkv}/{qkv_all} Q/K/V and {gate_up}/{gate_up_all} gate/up groups"]
    log[0] += f" ({'; '.join(weights)})" if weights else ""
    log += [f"{NAME}: {count} groups left per projection: {why}" for why, count in skipped.items()]
    return log


def ungroup_base_gemms(model: nn.Module) -> None:
    """Undo apply_grouped_base_gemm: per-projection GEMMs, and every weight in a storage of its own."""
    for group in _GROUPS.pop(model, []):
        group.release()
