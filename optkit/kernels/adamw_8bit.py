"""Blockwise 8-bit AdamW with one Triton launch per step (per parameter dtype), and its float64 reference.

What is fused: bitsandbytes' AdamW8bit updates each parameter tensor with its own kernel and its own host
work; a Llama-3-8B LoRA on all seven projections has 448 adapter tensors, and that step took 28-48 ms on an
H100 against 1.6 ms for torch's foreach AdamW. Here one kernel walks a table of every tensor's 256-element
blocks: it reads each gradient and parameter at their own addresses (no gather into a flat buffer, no
scatter back), the two 8-bit moments and their per-block scales from flat state buffers, and writes all
of them back.

The update (decoupled weight decay as torch.optim.AdamW), per element in fp32 at the tensor's step t:
    m = b1 m' + (1 - b1) g        v = b2 v' + (1 - b2) g^2        (m', v': the dequantized stored moments)
    p = p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
The parameter moves by the fp32 m and v; only what is kept for the next step is quantized: per block of
256 elements, absmax A = max |m|, and each element stores the 8-bit index of the map entry nearest m / A
(ties go to the lower entry); v likewise, with its own absmax and an unsigned map. The bias corrections
are computed per tensor in fp64 (1 - 0.999^t in fp32 keeps only 4 digits at t = 1).

Quantization maps (dynamic tree quantization, Dettmers et al. 2021, "8-bit Optimizers via Block-wise
Quantization"): after the sign bit (m only), the count E of leading zero bits is a decimal exponent, the
next bit (a 1) an indicator, the remaining bits a linear fraction: value = 10^-E x f, f in (0.1, 1] in n_E
even steps; all-zero bits = 0.
- m, signed: E = 0..6 with n_E = 2^(6-E); the pattern "-0" encodes -1e-7 so that all 256 entries differ.
- v, unsigned: E = 0..7 with n_E = 2^(7-E).
Error bound: a stored moment is within half a map step of the fp32 one, step = A x 0.9 x 10^-E / n_E in
band E; relative to the element at most 4.5 / n_E (m: 7% at the bottom of the top band, 0.7% at its top;
v: 3.5% / 0.35%). An element under half its sign's smallest nonzero entry is stored as 0 (m: 5e-7 A above
zero, 5e-8 A below; v: 5e-8 A).

Layout (chosen once, at construction, by ``FusedAdamW8bit``):
- Blocks never straddle tensors: each tensor's state starts at a block boundary (at most 255 padding bytes
  per tensor and moment). A shared block would give a small-valued tensor the absmax of a large
  neighbour, and its moments would round to 0.
- Every tensor has 8-bit state, small ones too (bitsandbytes keeps fp32 state under 4096 elements): a
  block's own absmax already gives a 1-element tensor an exact moment (+-1 x A), a 255-element tensor is
  one block like any other, and a second, fp32 path would cost a second launch.
- Parameters stay where they are (not re-homed as views of one flat buffer): a step's address table holds
  each parameter's and gradient's data pointer, rebuilt only when one changes. Model state dicts,
  safetensors (which rejects tensors sharing storage) and ``zero_grad(set_to_none=True)`` see ordinary
  tensors, and no copy in or out costs memory traffic.
- The kernel writes parameters through raw pointers, so the step bumps their autograd version counters
  itself: caches keyed on ``_version`` see the update.

Limits: parameters on one device, fp32 / fp16 / bf16, contiguous, dense gradients; no amsgrad / maximize.
On a CPU without ``TRITON_INTERPRET=1`` the step runs the float64 reference per tensor (slow, exact).
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import torch
import triton
import triton.language as tl

BLOCK = 256  # elements per absmax: bitsandbytes' blockwise optimizer block
STATE_KEYS = ("step", "m_codes", "m_absmax", "v_codes", "v_absmax")
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# GPU: 4 blocks per program is 1024 elements, 8 per thread at 4 warps (two 16-byte fp32 loads); a Llama-3-8B
# LoRA (42 M adapter elements) is ~41 K programs. Under the interpreter a program is a Python loop
# iteration: wider programs keep the tests fast.
ROWS_CUDA, WARPS_CUDA, ROWS_INTERPRETER = 4, 4, 64


@functools.cache
def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 entries of the dynamic tree map (module doc), ascending, as fp32 (what the kernel decodes)."""
    exponents = 7 if signed else 8  # bits after the sign
    values = [0.0]
    for e in range(exponents):
        steps = 2 ** (exponents - 1 - e)
        levels = [10.0**-e * (0.1 + 0.9 * j / steps) for j in range(1, steps + 1)]
        values += levels + ([-x for x in levels] if signed else [])
    if signed:
        values.append(-1e-7)
    table = torch.tensor(sorted(values), dtype=torch.float64).float()
    assert table.numel() == 256 and bool((table[1:] > table[:-1]).all())
    return table


def zero_code(signed: bool) -> int:
    """The 8-bit index that decodes to 0: what fresh state holds."""
    return int((dynamic_map(signed) == 0).nonzero().item())


# ----------------------------------------------------------------------------------------------------
# Reference: one tensor, float64, plain PyTorch (what the tests trust; the CPU fallback without Triton)
# ----------------------------------------------------------------------------------------------------


def reference_quantize(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the ``table`` entry nearest each ``x`` (ties to the lower index), as uint8."""
    table = table.to(device=x.device, dtype=torch.float64)
    x = x.double()
    below = (torch.searchsorted(table, x, right=True) - 1).clamp(0, table.numel() - 1)
    above = (below + 1).clamp(max=table.numel() - 1)
    take_above = (table[above] - x) < (x - table[below])
    return torch.where(take_above, above, below).to(torch.uint8)


def _blocks(values: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """A tensor's elements as (n_blocks, BLOCK) float64 rows, zero-padded at the end."""
    flat = values.reshape(-1).double()
    return torch.nn.functional.pad(flat, (0, n_blocks * BLOCK - flat.numel())).view(n_blocks, BLOCK)


def _quantize_blocks(moment: torch.Tensor, signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    absmax = moment.abs().amax(dim=1, keepdim=True)
    normalized = torch.where(absmax > 0, moment / absmax.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return reference_quantize(normalized, dynamic_map(signed)).view(-1), absmax.view(-1).float()


def reference_adamw_8bit(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: Dict[str, torch.Tensor],
    *,
    lr: float,
    betas: Tuple[float, float],
    eps: float,
    weight_decay: float,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One AdamW step of one tensor in float64: (new parameter in float64, new state; its ``m`` and ``v`` are
    the float64 moments before quantization, one per element of the padded blocks).

    ``state`` holds the tensor's ``step`` (steps taken so far), ``m_codes`` / ``v_codes`` (uint8, one per
    element of its padded blocks) and ``m_absmax`` / ``v_absmax`` (fp32, one per block), as the optimizer
    keeps them. Padding elements decode to 0 and stay 0.
    """
    beta1, beta2 = betas
    step = float(state["step"]) + 1
    n_blocks, n = state["m_absmax"].numel(), param.numel()
    live = (torch.arange(n_blocks * BLOCK, device=param.device) < n).view(n_blocks, BLOCK)
    m_table, v_table = (dynamic_map(s).to(device=param.device, dtype=torch.float64) for s in (True, False))
    m_prev = m_table[state["m_codes"].long()].view(n_blocks, BLOCK) * state["m_absmax"].double()[:, None]
    v_prev = v_table[state["v_codes"].long()].view(n_blocks, BLOCK) * state["v_absmax"].double()[:, None]
    g = _blocks(grad, n_blocks)
    m = torch.where(live, beta1 * m_prev + (1 - beta1) * g, 0.0)
    v = torch.where(live, beta2 * v_prev + (1 - beta2) * g * g, 0.0)
    denom = v.sqrt() / (1 - beta2**step) ** 0.5 + eps
    update = (lr / (1 - beta1**step) * m / denom).view(-1)[:n].view(param.shape)
    new_param = param.double() * (1 - lr * weight_decay) - update
    m_codes, m_absmax = _quantize_blocks(m, signed=True)
    v_codes, v_absmax = _quantize_blocks(v, signed=False)
    new_state = {"step": torch.tensor(step), "m_codes": m_codes, "m_absmax": m_absmax}
    return new_param, {**new_state, "v_codes": v_codes, "v_absmax": v_absmax, "m": m.view(-1), "v": v.view(-1)}


# ----------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _nearest_code(x, table_ptr):
    """Index of the ascending 256-entry table's entry nearest x (ties to the lower); table[0] <= x."""
    below = tl.zeros(x.shape, dtype=tl.int32)
    for i in tl.static_range(8):  # binary search: the largest index whose entry is <= x
        candidate = below + (128 >> i)
        below = tl.where(tl.load(table_ptr + candidate) <= x, candidate, below)
    above = tl.minimum(below + 1, 255)
    take_above = (tl.load(table_ptr + above) - x) < (x - tl.load(table_ptr + below))
    return tl.where(take_above, above, below).to(tl.uint8)


# Reads per element: gradient + parameter (DTYPE), two 1-byte codes; writes parameter + two codes; per
# block two fp32 absmax read and written. Table lookups hit a 2 KB map that stays in L1.
@triton.jit
def _adamw_8bit_kernel(
    block_tensor_ptr,  # int32 (n_blocks,): which tensor each block belongs to
    first_block_ptr,  # int64 (T,): each tensor's first block
    numel_ptr,  # int64 (T,)
    group_ptr,  # int32 (T,): each tensor's param group
    step_ptr,  # fp32 (T,): each tensor's step count, this step included
    param_addr_ptr,  # int64 (T,): data pointers
    grad_addr_ptr,  # int64 (T,): data pointers, 0 where a tensor has no gradient this step
    hyper_ptr,  # fp64 (G, 5): lr, weight_decay, beta1, beta2, eps
    m_table_ptr,  # fp32 (256,): signed map
    v_table_ptr,  # fp32 (256,): unsigned map
    m_codes_ptr,  # uint8 (n_blocks * BLOCK,)
    v_codes_ptr,
    m_absmax_ptr,  # fp32 (n_blocks,)
    v_absmax_ptr,
    n_blocks,
    stride_hyper_group,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) block ids
    tensor = tl.load(block_tensor_ptr + rows, mask=rows < n_blocks, other=0)
    grad_addr = tl.load(grad_addr_ptr + tensor)
    param_addr = tl.load(param_addr_ptr + tensor)
    row_ok = (rows < n_blocks) & (grad_addr != 0)
    # A tensor without a gradient is skipped; its null address is replaced by a valid one that no lane reads.
    grad_base = tl.where(grad_addr != 0, grad_addr, param_addr).to(tl.pointer_type(DTYPE))
    param_base = param_addr.to(tl.pointer_type(DTYPE))

    group = tl.load(group_ptr + tensor)
    hyper = hyper_ptr + group * stride_hyper_group
    lr, weight_decay = tl.load(hyper), tl.load(hyper + 1)
    beta1, beta2, eps = tl.load(hyper + 2), tl.load(hyper + 3), tl.load(hyper + 4)
    step = tl.load(step_ptr + tensor).to(tl.float64)
    correction1 = 1.0 - tl.exp(step * tl.log(beta1))  # fp64: 1 - b^t without fp32 cancellation
    correction2 = 1.0 - tl.exp(step * tl.log(beta2))
    step_size = (lr / correction1).to(tl.float32)[:, None]
    correction2_sqrt = tl.sqrt(correction2.to(tl.float32))[:, None]
    decay = (1.0 - lr * weight_decay).to(tl.float32)[:, None]
    # 1 - b in fp64 before rounding: 1 - fp32(0.999) is 1.3e-5 off 0.001
    b1, one_minus_b1 = beta1.to(tl.float32)[:, None], (1.0 - beta1).to(tl.float32)[:, None]
    b2, one_minus_b2 = beta2.to(tl.float32)[:, None], (1.0 - beta2).to(tl.float32)[:, None]
    eps32 = eps.to(tl.float32)[:, None]

    cols = tl.arange(0, BLOCK)
    local = (rows - tl.load(first_block_ptr + tensor))[:, None] * BLOCK + cols[None, :]  # (ROWS, BLOCK)
    mask = row_ok[:, None] & (local < tl.load(numel_ptr + tensor)[:, None])
    state = rows[:, None] * BLOCK + cols[None, :]
    g = tl.load(grad_base[:, None] + local, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(param_base[:, None] + local, mask=mask, other=0.0).to(tl.float32)
    m_codes = tl.load(m_codes_ptr + state, mask=mask, other=0).to(tl.int32)
    v_codes = tl.load(v_codes_ptr + state, mask=mask, other=0).to(tl.int32)
    m_scale = tl.load(m_absmax_ptr + rows, mask=row_ok, other=0.0)[:, None]
    v_scale = tl.load(v_absmax_ptr + rows, mask=row_ok, other=0.0)[:, None]
    m_prev = tl.where(mask, tl.load(m_table_ptr + m_codes) * m_scale, 0.0)
    v_prev = tl.where(mask, tl.load(v_table_ptr + v_codes) * v_scale, 0.0)

    m = b1 * m_prev + one_minus_b1 * g
    v = b2 * v_prev + one_minus_b2 * g * g
    p = p * decay - step_size * m / (tl.sqrt(v) / correction2_sqrt + eps32)
    tl.store(param_base[:, None] + local, p.to(DTYPE), mask=mask)

    m_absmax = tl.max(tl.abs(m), axis=1)  # padding and masked lanes hold 0
    v_absmax = tl.max(v, axis=1)
    # an all-zero block divides 0 by the smallest normal float: 0, without a 0 / 0
    m_unit = m / tl.maximum(m_absmax, 1.1754943508222875e-38)[:, None]
    v_unit = v / tl.maximum(v_absmax, 1.1754943508222875e-38)[:, None]
    tl.store(m_codes_ptr + state, _nearest_code(tl.minimum(tl.maximum(m_unit, -1.0), 1.0), m_table_ptr), mask=mask)
    tl.store(v_codes_ptr + state, _nearest_code(tl.minimum(v_unit, 1.0), v_table_ptr), mask=mask)
    tl.store(m_absmax_ptr + rows, m_absmax, mask=row_ok)
    tl.store(v_absmax_ptr + rows, v_absmax, mask=row_ok)


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _upload(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without a host-device sync (pinned memory, non-blocking copy; the
    caching host allocator keeps the pinned block until the copy has run)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------


class _Bucket:
    """The parameters of one dtype: their tables, their flat 8-bit state, and the step's launch."""

    def __init__(self, params: List[torch.Tensor], groups: List[int], device: torch.device):
        self.params, self.dtype, self.device = params, params[0].dtype, device
        self.groups = groups  # each tensor's param group index
        blocks = [triton.cdiv(p.numel(), BLOCK) for p in params]
        first = torch.tensor([0, *blocks[:-1]]).cumsum(0).tolist()
        self.first_block, self.blocks_of, self.n_blocks = first, blocks, sum(blocks)
        t = len(params)
        self.block_tensor = torch.repeat_interleave(torch.arange(t, dtype=torch.int32), torch.tensor(blocks)).to(device)
        self.first_block_table = torch.tensor(first, dtype=torch.int64, device=device)
        self.numel_table = torch.tensor([p.numel() for p in params], dtype=torch.int64, device=device)
        self.group_table = torch.tensor(groups, dtype=torch.int32, device=device)
        self.steps = torch.zeros(t, dtype=torch.float32, device=device)
        n_state = self.n_blocks * BLOCK
        self.m_codes = torch.full((n_state,), zero_code(True), dtype=torch.uint8, device=device)
        self.v_codes = torch.full((n_state,), zero_code(False), dtype=torch.uint8, device=device)
        self.m_absmax = torch.zeros(self.n_blocks, dtype=torch.float32, device=device)
        self.v_absmax = torch.zeros(self.n_blocks, dtype=torch.float32, device=device)
        self.m_table, self.v_table = dynamic_map(True).to(device), dynamic_map(False).to(device)
        self._addresses: Tuple[int, ...] = ()
        self._address_table = torch.zeros(2, t, dtype=torch.int64, device=device)

    def state_of(self, i: int) -> Dict[str, torch.Tensor]:
        """Tensor ``i``'s state as views of the flat buffers (what ``Optimizer.state`` holds)."""
        lo, hi = self.first_block[i], self.first_block[i] + self.blocks_of[i]
        return {
            "step": self.steps[i],
            "m_codes": self.m_codes[lo * BLOCK : hi * BLOCK],
            "m_absmax": self.m_absmax[lo:hi],
            "v_codes": self.v_codes[lo * BLOCK : hi * BLOCK],
            "v_absmax": self.v_absmax[lo:hi],
        }

    def step(self, hyper: torch.Tensor, param_groups: List[dict]) -> None:
        grads = [p.grad for p in self.params]
        if all(g is None for g in grads):
            return
        for g in grads:
            if g is not None and g.is_sparse:
                raise RuntimeError("adamw_8bit_fused does not take sparse gradients; use torch.optim.SparseAdam")
        grads = [g if g is None or g.is_contiguous() else g.contiguous() for g in grads]
        addresses = tuple(p.data_ptr() for p in self.params) + tuple(0 if g is None else g.data_ptr() for g in grads)
        if addresses != self._addresses:
            self._address_table = _upload(addresses, torch.int64, self.device).view(2, len(self.params))
            self._addresses = addresses
        # a tensor without a gradient keeps its step count, as in torch's AdamW
        self.steps.add_((self._address_table[1] != 0) if any(g is None for g in grads) else 1.0)
        if _use_triton(self.device):
            self._launch(hyper)
        else:
            self._reference_step(grads, param_groups)
        torch.autograd.graph.increment_version([p for p, g in zip(self.params, grads) if g is not None])

    def _launch(self, hyper: torch.Tensor) -> None:
        rows, warps = (ROWS_CUDA, WARPS_CUDA) if self.device.type == "cuda" else (ROWS_INTERPRETER, 1)
        _adamw_8bit_kernel[(triton.cdiv(self.n_blocks, rows),)](
            self.block_tensor,
            self.first_block_table,
            self.numel_table,
            self.group_table,
            self.steps,
            self._address_table[0],
            self._address_table[1],
            hyper,
            self.m_table,
            self.v_table,
            self.m_codes,
            self.v_codes,
            self.m_absmax,
            self.v_absmax,
            self.n_blocks,
            hyper.stride(0),
            DTYPE=_TL_DTYPES[self.dtype],
            BLOCK=BLOCK,
            ROWS=rows,
            num_warps=warps,
        )

    def _reference_step(self, grads, param_groups: List[dict]) -> None:
        for i, (param, grad) in enumerate(zip(self.params, grads)):
            if grad is None:
                continue
            state = self.state_of(i)
            group = param_groups[self.groups[i]]
            before = {**state, "step": state["step"] - 1}
            settings = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}
            new_param, new_state = reference_adamw_8bit(param, grad, before, **settings)
            param.copy_(new_param)
            for key in STATE_KEYS[1:]:
                state[key].copy_(new_state[key])


class FusedAdamW8bit(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit moments: one Triton launch per step and parameter dtype (module doc).

    Param groups may differ in lr, betas, eps and weight_decay (HF Trainer's decay / no-decay split); an LR
    scheduler's changes are read at every step. ``state[p]`` holds views of the flat state, so
    ``state_dict`` / ``load_state_dict`` round-trip it (HF Trainer's checkpoints) without copies.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"adamw_8bit_fused: need lr, eps, weight_decay >= 0 and 0 <= betas < 1, got "
                f"lr={lr}, eps={eps}, weight_decay={weight_decay}, betas={betas}"
            )
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        members = [(p, gi) for gi, group in enumerate(self.param_groups) for p in group["params"]]
        self._check_params([p for p, _ in members])
        self.device = members[0][0].device
        by_dtype: Dict[torch.dtype, List[Tuple[torch.Tensor, int]]] = defaultdict(list)
        for p, gi in members:
            by_dtype[p.dtype].append((p, gi))
        self._buckets = [
            _Bucket([p for p, _ in entries], [gi for _, gi in entries], self.device) for entries in by_dtype.values()
        ]
        self._hyper_key: Tuple = ()
        self._install_state_views()

    @staticmethod
    def _check_params(params: List[torch.Tensor]) -> None:
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"adamw_8bit_fused steps parameters on one device, got {sorted(map(str, devices))}")
        for p in params:
            if p.dtype not in _TL_DTYPES or not p.is_contiguous():
                raise ValueError(
                    f"adamw_8bit_fused takes contiguous fp32 / fp16 / bf16 parameters, got a "
                    f"{p.dtype} parameter of shape {tuple(p.shape)} (contiguous: {p.is_contiguous()})"
                )

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_buckets", None) is not None:
            raise NotImplementedError(
                "adamw_8bit_fused lays out its state at construction: build a new optimizer "
                "over all parameter groups instead of adding one"
            )
        super().add_param_group(param_group)

    def _install_state_views(self) -> None:
        for bucket in self._buckets:
            for i, p in enumerate(bucket.params):
                self.state[p] = bucket.state_of(i)

    def _hyperparameters(self) -> torch.Tensor:
        key = tuple(
            (float(g["lr"]), float(g["weight_decay"]), float(g["betas"][0]), float(g["betas"][1]), float(g["eps"]))
            for g in self.param_groups
        )
        if key != self._hyper_key:  # an LR schedule changes it every step; a constant LR uploads once
            self._hyper = _upload(key, torch.float64, self.device)
            self._hyper_key = key
        return self._hyper

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hyper = self._hyperparameters()
        for bucket in self._buckets:
            bucket.step(hyper, self.param_groups)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Hyperparameters through torch's loader; the 8-bit state copied into the flat buffers as saved
        (torch's loader would cast codes and scales to the parameter's dtype)."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        self._install_state_views()
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params):
            if saved_id not in saved:
                continue
            entry, live = saved[saved_id], self.state[param]
            missing = [k for k in STATE_KEYS if k not in entry]
            if missing:
                raise ValueError(
                    f"this optimizer state has no {', '.join(missing)}: it was saved by another "
                    "optimizer; resume with the train.optimizer that wrote it"
                )
            for key in STATE_KEYS:
                value = torch.as_tensor(entry[key])
                if value.shape != live[key].shape:
                    raise ValueError(
                        f"saved {key} of shape {tuple(value.shape)} does not fit the parameter's "
                        f"{tuple(live[key].shape)}: the checkpoint is of another model"
                    )
                live[key].copy_(value)
