"""Per-op kernel benchmark (``optkit bench suite=kernels``): optkit's Triton kernels side by side with
eager PyTorch, torch.compile of that eager code and Liger-Kernel, at published model shapes.

One row per op x shape x dtype x implementation (fields: ``KERNEL_ROW_FIELDS``), all in one process.
Two times per phase (forward, backward, forward+backward = "full"), from two separate passes:

- event time (``fwd_ms``, ``bwd_ms``, ``full_ms``): CUDA events on the stream around the phase
  (``PhaseTimer``), median of many repeats, warm-up excluded. The device's wall time from the first
  launch to the last kernel's end: launch gaps count. Events bracket device work without a sync per
  repeat, so the host queues ahead as in training; where it cannot (small ops, eager's many small
  launches, autograd's per-call cost) the GPU idles and this time measures the host. The latency an
  op adds to a step that does nothing else.
- device time (``fwd_device_ms``, ``bwd_device_ms``, ``full_device_ms``): the same callables, a few
  repeats per phase, each in its own ``record_function`` region under ``torch.profiler`` (CUDA
  activity, and CPU for the region markers), in a pass of its own that runs after every event-timed
  row; the time the kernels, memcpys and memsets launched in a region were running (their
  intervals' union: one stream, so their summed durations), median over repeats. Host gaps are
  excluded: what the kernels cost when the host keeps ahead, as it does inside a training step whose
  neighbours are large. ``gbps_device`` and ``frac_of_copy_device`` come from it: those judge the
  kernels (e.g. ">= 85% of copy bandwidth"); ``gbps_full`` / ``frac_of_copy`` judge op + launch path.
  ``n_kernels_full`` counts the launches of one forward+backward.

Both passes: L2 flushed before every repeat by writing a buffer of at least 2x the L2 size (in the
device pass, before the traced region, which therefore never contains the flush); every repeat gets
fresh copies of the inputs (an implementation that writes into its inputs, as Liger's cross entropy
stores the gradient in the logits, cannot skew the next repeat) and builds its own autograd graph;
gradients come from ``torch.autograd.grad`` w.r.t. every differentiable input (weights included), so
nothing accumulates and no graph is replayed with retain_graph.

Why the device pass comes last and traces a whole case per session: a profiler session leaves CUPTI
attached to the process (Kineto tears it down only with TEARDOWN_CUPTI=1), which slows later kernel
launches (pytorch/pytorch#144455), so no event-timed row may follow one; and each new session in a
process returns a few kernel records at its head with timestamps from another clock, one more per
session (pytorch/pytorch#192021), so sessions are few, each starts with a burst of throw-away
launches, and a session whose burst was entirely lost gives no device times (``device_error`` says
so). The rows are appended to results.jsonl as the event pass makes them (a killed run keeps them,
with ``device_error`` saying that the device pass did not run) and rewritten in place, device times
filled, when the device pass ends. Device time needs CUDA: on the CPU its fields are None.

Also per row: achieved GB/s from the bytes the op must move (table below), beside the device's copy
bandwidth measured in the same run (one large device-to-device copy, bytes read + written);
allocator peak of one forward+backward, absolute and as the delta over the inputs; NVML clocks,
throttle reasons and other GPU processes while the row's event pass ran. The ops' own numerics, and
the optkit kernels' optional modes (e.g. cross_entropy's overwrite_logits), are not exercised here:
defaults only, correctness lives in tests/kernels. One exception, a sweep: fused_linear_cross_entropy
also runs as ``optkit-c256``, ``optkit-c512`` and ``optkit-c2048`` (``chunk_rows`` fixed; plain
``optkit`` picks 1024 at the suite's shape), to show chunk size against speed and peak memory.

Bytes the op must move: a lower bound every implementation is held to (N tokens, s bytes per
element of the benchmark dtype; int64 targets; fp32 per-row statistics; "+" terms are small):

| op                         | forward                                   | backward                                            |
|----------------------------|-------------------------------------------|-----------------------------------------------------|
| rms_norm (N, H)            | read x, w; write y (+ rstd N*4)           | read dy, x, w, rstd; write dx, dw                   |
| rope q (B,Hq,S,D), k       | read q, k, cos, sin (S*D); write q', k'   | read dq', dk', cos, sin; write dq, dk               |
| swiglu / geglu (N, I)      | read gate, up; write out (3*N*I*s)        | read dout, gate, up; write dgate, dup (5*N*I*s)     |
| cross_entropy (N, V)       | read logits (+ target); write lse (N*4)   | read logits, lse, target; write dlogits             |
| fused_linear_cross_entropy | read h (N,H), W (V,H) (+ target)          | read h, W again; write dh, dW                       |

"full" is forward + backward. The counts are logical traffic: a fused cross entropy that re-reads a
row's logits from L2 in its gradient pass moves less through HBM and can show > 100% of copy.
Fused cross-entropy implementations (optkit and its chunk sweep, Liger) compute the gradient inside
forward: their fwd_ms holds backward work and their bwd_ms is a mere scale, so the row says
``loss_in_forward`` and they are compared on ``full_ms`` / ``full_device_ms`` only. The FLCE op is
compute-bound (6*N*H*V matmul FLOPs per forward+backward): its rows also carry ``tflops_full``.

torch.compile compiles each op once per non-token shape with the token dimension marked dynamic
(as training with varying sequence lengths sees it), so token sweeps reuse one compiled graph and
the suite fits its time budget (< 5 min on an H100, quick mode < 90 s). Dynamo is reset between
shapes so that a second hidden size never turns the feature dimension dynamic; the device pass,
which revisits the shapes, compiles each once more (Inductor's caches make that quick).

Entry points: ``run(cfg, run_dir)`` (the runner, via ``python -m optkit.kernel_suite``),
``run_suite(...)`` (scripts/bench_kernels.py, tests) and ``format_table(rows)``.
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import gc
import importlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from optkit.measure.stats import percentile, summarize
from optkit.measure.timing import PhaseTimer, WallClock
from optkit.results import append_row

KERNEL_SCHEMA_VERSION = 2  # bump when a kernel row field changes meaning (2: device-time fields)
SUITE = "kernels"
IMPLS = ("optkit", "eager", "compile", "liger")  # every op
OPS = ("rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "fused_linear_cross_entropy")
FLCE = "fused_linear_cross_entropy"
# FLCE's chunk-size sweep: optkit with fixed rows per chunk (its default is 1024 at the suite's shape;
# Liger budgets 256 rows here). Fewer rows: a smaller logits buffer, more grad_weight traffic.
CHUNK_IMPLS: Dict[str, int] = {f"optkit-c{rows}": rows for rows in (256, 512, 2048)}
ALL_IMPLS = IMPLS + tuple(CHUNK_IMPLS)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# The sweep: shapes come from conf/model/<name>.yaml (published config.json values).
MODELS = ("llama3_8b", "qwen3_8b", "gemma2_9b")
TOKENS = (1024, 4096, 16384)
CE_TOKENS = (4096, 8192)
FLCE_POINTS = (("llama3_8b", 8192),)  # 8192 x 4096 -> 128256
ROPE_SEQ_LEN = 4096  # rope batches of tokens // 4096 sequences (one shorter sequence below that)
# Quick mode: one shape per op (the first model providing it) at a typical step's token count.
QUICK_TOKENS = (4096,)
QUICK_CE_TOKENS = (8192,)
IGNORE_INDEX = -100
TOKEN_DIMS = ("T", "B", "S")  # dims of a Case that grow with the token count


@dataclass(frozen=True)
class Settings:
    """How long each implementation is measured; ``loop_ms`` of timed work per loop, clamped."""

    warmup_steps: int = 3  # at least this many forward+backward steps ...
    warmup_ms: float = 50.0  # ... and at least this much wall time (after the first, compiling, call)
    loop_ms: float = 200.0  # target timed work of each loop (full, backward-only)
    min_repeats: int = 20
    max_repeats: int = 200
    max_warmup_steps: int = 50
    device_repeats: int = 5  # profiled repeats per phase in the device pass; 0 skips that pass
    device_warmup_steps: int = 2  # forward+backward steps before the profiler session (after the first)


FULL_SETTINGS = Settings()
QUICK_SETTINGS = Settings(warmup_steps=2, warmup_ms=20.0, loop_ms=60.0, min_repeats=10, max_repeats=50)
SMOKE_SETTINGS = Settings(warmup_steps=1, warmup_ms=0.0, loop_ms=0.0, min_repeats=3, max_repeats=3,
                          device_repeats=2, device_warmup_steps=1)
NVML_INTERVAL_MS = 50.0  # clocks / throttling only (memory comes from the allocator): sample lightly
COPY_BYTES = {"cuda": 1 << 30, "cpu": 16 << 20}  # copy-bandwidth buffer: >> L2 on any GPU
MIN_FLUSH_BYTES = 256 << 20  # triton.testing's flush size; 2x L2 when that is larger

KERNEL_ROW_FIELDS: Dict[str, str] = {
    "schema_version": "KERNEL_SCHEMA_VERSION of the code that wrote the row",
    "run_id": "id of the run (its directory name)", "suite": "'kernels'", "kind": "'kernel'",
    "status": "ok | oom | error | skipped", "error": "why, when status != ok",
    "op": "one of OPS", "impl": "optkit | eager | compile | liger | optkit-c<rows> (FLCE chunk sweep)",
    "impl_version": "version of the impl's code",
    "dtype": "input dtype", "model": "zoo model the shape comes from", "shape": "shape string, e.g. T4096xH4096",
    "dims": "named dims of the shape", "params": "op parameters (eps, cast_mode, softcap, ...)",
    "tokens": "N, rows of the op", "hidden": "features per token of the op's main input",
    "point_key": "op/impl/dtype/shape (what regress matches on)", "device": "cuda | cpu",
    "timer": "cuda_events | host_clock", "warmup_steps": "untimed forward+backward steps",
    "repeats": "timed repeats per loop", "compile_s": "wall time of the first call (compile / JIT), s",
    "fwd_ms": "median forward event time (cold L2; launch gaps included)",
    "bwd_ms": "median backward event time (own loop, cold L2)",
    "full_ms": "median forward+backward event time: first launch to last kernel end, host gaps included",
    "full_ms_p10": "10th percentile", "full_ms_p90": "90th percentile",
    "full_ms_iqr": "interquartile range", "full_ms_noisy": "IQR / median > 10%",
    "full_times_ms": "every timed full repeat", "fwd_times_ms": "every forward", "bwd_times_ms": "every backward",
    "bytes_fwd": "bytes the forward must move", "bytes_bwd": "bytes the backward must move",
    "bytes_full": "bytes_fwd + bytes_bwd",
    "gbps_full": "bytes_full / full_ms, GB/s (1e9): op + launch path (a host-bound op shows the host here)",
    "gbps_fwd": "None when loss_in_forward", "gbps_bwd": "None when loss_in_forward",
    "copy_gbps": "device-to-device copy bandwidth measured in this run (read + written)",
    "frac_of_copy": "gbps_full / copy_gbps", "flops_full": "matmul FLOPs of forward+backward (FLCE only)",
    "fwd_device_ms": "median time the forward's kernels/memcpys/memsets ran (profiler, cold L2): no host gaps",
    "bwd_device_ms": "the same for the backward (forward untraced, L2 flushed in between)",
    "full_device_ms": "the same for forward+backward in one traced region",
    "full_device_times_ms": "every profiled forward+backward's device time",
    "device_repeats": "profiled repeats per phase",
    "n_kernels_full": "kernels + memcpys + memsets per forward+backward (median over the profiled repeats)",
    "gbps_device": "bytes_full / full_device_ms, GB/s: the kernels' own bandwidth",
    "frac_of_copy_device": "gbps_device / copy_gbps: what a bandwidth target (e.g. >= 85% of copy) is judged on",
    "device_error": "why the device fields are None on an ok row (no CUDA, pass not run, trace lost records)",
    "tflops_full": "flops_full / full_ms, TFLOP/s",
    "loss_in_forward": "impl computes grads in forward: compare full_ms / full_device_ms",
    "peak_bytes": "allocator peak during one forward+backward (includes inputs and the flush buffer)",
    "peak_delta_bytes": "peak_bytes - allocated before the call: the op's own memory",
    "peak_reserved_bytes": "allocator reserved peak", "l2_flush_bytes": "bytes written before each repeat",
    "throttled": "NVML saw a performance-limiting clock reason while this row was measured (None: no NVML)",
    "throttle_reasons": "NVML clock-event reasons seen", "sm_clock_mhz_min": "lowest SM clock sampled",
    "other_gpu_processes": "other processes on the GPU when the row started ([{pid, used_bytes}])",
    "gpu_name": "GPU name", "gpu_slug": "e.g. h100", "torch": "torch version", "triton": "triton version",
    "git_sha": "optkit commit", "git_dirty": "uncommitted changes", "env_fingerprint": "comparable-stack hash",
    "timestamp": "UTC ISO time the row was written",
}


def empty_kernel_row() -> Dict[str, Any]:
    row = dict.fromkeys(KERNEL_ROW_FIELDS)
    row.update(schema_version=KERNEL_SCHEMA_VERSION, suite=SUITE, kind="kernel")
    return row


class ImplUnavailable(Exception):
    """This implementation cannot run here (not installed, wrong device); becomes a skipped row."""


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One op at one shape. ``dims`` are named sizes, ``params`` the op's non-tensor arguments."""

    op: str
    model: str
    dims: Dict[str, int]
    params: Dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.dims["T"]

    @property
    def shape(self) -> str:
        return self._label(self.dims)

    @property
    def compile_group(self) -> Tuple[str, str]:
        """Cases one compiled graph serves: the same op and sizes but for those that grow with tokens."""
        return self.op, self._label({k: v for k, v in self.dims.items() if k not in TOKEN_DIMS})

    def _label(self, dims: Dict[str, int]) -> str:
        mode = self.params.get("cast_mode")
        suffix = f"-{mode}" if mode not in (None, "llama") else ""
        if self.params.get("softcap"):
            suffix += f"-softcap{self.params['softcap']:g}"
        return "x".join(f"{k}{v}" for k, v in dims.items()) + suffix


def model_shape(name: str) -> Dict[str, Any]:
    """The sizes an op benchmark needs, read from conf/model/<name>.yaml."""
    from omegaconf import OmegaConf

    from optkit.compose import CONF_DIR

    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"model {name!r} has no {path}; choose one of the files in {path.parent}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    hf = cfg["hf_config"]
    heads = hf["num_attention_heads"]
    return {
        "family": cfg["family"], "hidden": hf["hidden_size"], "intermediate": hf["intermediate_size"],
        "heads_q": heads, "heads_kv": hf.get("num_key_value_heads", heads),
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads, "vocab": hf["vocab_size"],
        "eps": hf.get("rms_norm_eps", 1e-6), "softcap": hf.get("final_logit_softcapping"),
        "activation": hf.get("hidden_activation") or hf.get("hidden_act") or "silu",
    }


def _cases_for_model(op: str, model: str, m: Dict[str, Any], tokens: Sequence[int]) -> List[Case]:
    gemma = m["family"].startswith("gemma")
    if op == "rms_norm":
        params = {"eps": m["eps"], "offset": 1.0 if gemma else 0.0, "cast_mode": "gemma" if gemma else "llama"}
        return [Case(op, model, {"T": t, "H": m["hidden"]}, params) for t in tokens]
    if op == "rope":
        out = []
        for t in tokens:
            seq = min(t, ROPE_SEQ_LEN)
            if t % seq:
                raise ValueError(f"rope: {t} tokens are not whole sequences of {seq}; use a multiple of {seq}")
            dims = {"T": t, "B": t // seq, "S": seq, "Hq": m["heads_q"], "Hkv": m["heads_kv"], "D": m["head_dim"]}
            out.append(Case(op, model, dims))
        return out
    if op in ("swiglu", "geglu"):
        is_gelu = m["activation"].startswith("gelu")
        if is_gelu != (op == "geglu"):
            return []
        params = {"approximate": "tanh" if "tanh" in m["activation"] else "none"} if is_gelu else {}
        return [Case(op, model, {"T": t, "I": m["intermediate"]}, params) for t in tokens]
    if op == "cross_entropy":
        return [Case(op, model, {"T": t, "V": m["vocab"]}, {"softcap": m["softcap"]}) for t in tokens]
    if op == "fused_linear_cross_entropy":
        return [Case(op, model, {"T": t, "H": m["hidden"], "V": m["vocab"]}, {"softcap": m["softcap"]})
                for t in tokens]
    raise ValueError(f"op {op!r} unknown; choose one of: {', '.join(OPS)}")


def sweep_cases(quick: bool = False, ops: Sequence[str] = OPS) -> List[Case]:
    """The suite's cases, grouped by compile group; shapes shared by two models appear once."""
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"op(s) {', '.join(unknown)} unknown; choose from: {', '.join(OPS)}")
    cases: List[Case] = []
    for op in ops:
        if op == "fused_linear_cross_entropy":
            per_model = [(model, (t,)) for model, t in FLCE_POINTS]
        else:
            tokens = (QUICK_CE_TOKENS if quick else CE_TOKENS) if op == "cross_entropy" else (
                QUICK_TOKENS if quick else TOKENS)
            per_model = [(model, tokens) for model in MODELS]
        seen, op_cases = set(), []
        for model, tokens in per_model:
            for case in _cases_for_model(op, model, model_shape(model), tokens):
                if case.shape not in seen:
                    seen.add(case.shape)
                    op_cases.append(case)
        if quick:  # the first model's shape only
            first = op_cases[0].compile_group if op_cases else None
            op_cases = [c for c in op_cases if c.compile_group == first]
        cases.extend(op_cases)
    return cases


def smoke_cases(ops: Sequence[str] = OPS) -> List[Case]:
    """Tiny shapes (a vocab of 257: not a power of 2) for the CPU plumbing check."""
    tiny = {"family": "llama", "hidden": 64, "intermediate": 96, "heads_q": 4, "heads_kv": 2, "head_dim": 16,
            "vocab": 257, "eps": 1e-6, "softcap": None, "activation": "silu"}
    out: List[Case] = []
    for op in ops:
        m = dict(tiny, activation="gelu_pytorch_tanh") if op == "geglu" else tiny
        out.extend(_cases_for_model(op, "tiny", m, (16,)))
    return out


# --------------------------------------------------------------------------- ops
# make_inputs(case, dtype, device) -> named leaf tensors; those with requires_grad get gradients.


def _randn(shape, dtype, device, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


def _rms_norm_inputs(case: Case, dtype, device) -> Dict[str, torch.Tensor]:
    n, h = case.tokens, case.dims["H"]
    weight_center = 0.0 if case.params["offset"] else 1.0  # Gemma stores weight - 1
    return {"x": _randn((n, h), dtype, device),
            "weight": (_randn((h,), dtype, device, 0.1, grad=False) + weight_center).requires_grad_()}


def _rope_inputs(case: Case, dtype, device) -> Dict[str, torch.Tensor]:
    d = case.dims
    # HF's layout: (B, S, H, D) projections viewed as (B, H, S, D), not contiguous.
    q = torch.randn(d["B"], d["S"], d["Hq"], d["D"], device=device).to(dtype).transpose(1, 2)
    k = torch.randn(d["B"], d["S"], d["Hkv"], d["D"], device=device).to(dtype).transpose(1, 2)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d["D"], 2, device=device).float() / d["D"]))
    angles = torch.arange(d["S"], device=device).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)  # (S, D)
    return {"q": q.requires_grad_(), "k": k.requires_grad_(), "cos": emb.cos().to(dtype), "sin": emb.sin().to(dtype)}


def _gated_inputs(case: Case, dtype, device) -> Dict[str, torch.Tensor]:
    shape = (case.tokens, case.dims["I"])
    return {"gate": _randn(shape, dtype, device), "up": _randn(shape, dtype, device)}


def _targets(case: Case, device) -> torch.Tensor:
    return torch.randint(0, case.dims["V"], (case.tokens,), device=device)


def _ce_inputs(case: Case, dtype, device) -> Dict[str, torch.Tensor]:
    return {"logits": _randn((case.tokens, case.dims["V"]), dtype, device, 2.0), "target": _targets(case, device)}


def _flce_inputs(case: Case, dtype, device) -> Dict[str, torch.Tensor]:
    h, v = case.dims["H"], case.dims["V"]
    return {"hidden": _randn((case.tokens, h), dtype, device), "weight": _randn((v, h), dtype, device, h ** -0.5),
            "target": _targets(case, device)}


# The eager baselines: the code as users run it (HF's module math, F.* on upcast logits).


def _eager_rms_norm(x, weight, eps, offset, cast_mode):
    if cast_mode == "gemma":  # Gemma2RMSNorm: everything in fp32, one rounding at the end
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (normed * (offset + weight.float())).type_as(x)
    hidden = x.to(torch.float32)  # LlamaRMSNorm (Qwen2/3, Mistral alike)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _eager_rope(q, k, cos, sin):  # HF apply_rotary_pos_emb; cos/sin (S, D) broadcast over (B, H)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _eager_swiglu(gate, up):
    return F.silu(gate) * up


def _eager_geglu(gate, up, approximate="tanh"):
    return F.gelu(gate, approximate=approximate) * up


def _eager_cross_entropy(logits, target, softcap=None):
    if softcap:  # Gemma2ForCausalLM soft-caps in the logits' dtype before the loss
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)  # HF's loss upcasts


def _eager_flce(hidden, weight, target, softcap=None):
    return _eager_cross_entropy(F.linear(hidden, weight), target, softcap)


# Bytes the op must move (see the table in the module docstring): (forward, backward).


def _rms_norm_bytes(case: Case, s: int) -> Tuple[int, int]:
    n, h = case.tokens, case.dims["H"]
    fwd = 2 * n * h * s + h * s + 4 * n
    bwd = 3 * n * h * s + 2 * h * s + 4 * n
    return fwd, bwd


def _rope_bytes(case: Case, s: int) -> Tuple[int, int]:
    d = case.dims
    qk = d["B"] * d["S"] * (d["Hq"] + d["Hkv"]) * d["D"] * s
    cos_sin = 2 * d["S"] * d["D"] * s
    return 2 * qk + cos_sin, 2 * qk + cos_sin


def _gated_bytes(case: Case, s: int) -> Tuple[int, int]:
    n_i = case.tokens * case.dims["I"]
    return 3 * n_i * s, 5 * n_i * s


def _ce_bytes(case: Case, s: int) -> Tuple[int, int]:
    n, v = case.tokens, case.dims["V"]
    return n * v * s + 8 * n + 4 * n, 2 * n * v * s + 8 * n + 4 * n


def _flce_bytes(case: Case, s: int) -> Tuple[int, int]:
    n, h, v = case.tokens, case.dims["H"], case.dims["V"]
    operands = (n * h + v * h) * s
    return operands + 8 * n, 2 * operands


@dataclass(frozen=True)
class OpSpec:
    name: str
    make_inputs: Callable[[Case, torch.dtype, torch.device], Dict[str, torch.Tensor]]
    eager: Callable[..., Any]
    optkit_fn: str  # function name in optkit/kernels/<name>.py
    liger_fn: str  # function name in liger_kernel.transformers.functional
    bytes_moved: Callable[[Case, int], Tuple[int, int]]
    token_dims: Dict[str, Tuple[int, ...]]  # input -> dims that grow with tokens (dynamic under compile)
    fused_loss: bool = False  # optkit and Liger compute the gradient in forward

    def flops_full(self, case: Case) -> Optional[int]:
        if self.name != "fused_linear_cross_entropy":
            return None
        return 6 * case.tokens * case.dims["H"] * case.dims["V"]


SPECS: Dict[str, OpSpec] = {s.name: s for s in (
    OpSpec("rms_norm", _rms_norm_inputs, _eager_rms_norm, "rms_norm", "liger_rms_norm", _rms_norm_bytes,
           {"x": (0,)}),
    OpSpec("rope", _rope_inputs, _eager_rope, "apply_rotary", "liger_rope", _rope_bytes,
           {"q": (0, 2), "k": (0, 2), "cos": (0,), "sin": (0,)}),
    OpSpec("swiglu", _gated_inputs, _eager_swiglu, "swiglu", "liger_swiglu", _gated_bytes,
           {"gate": (0,), "up": (0,)}),
    OpSpec("geglu", _gated_inputs, _eager_geglu, "geglu", "liger_geglu", _gated_bytes,
           {"gate": (0,), "up": (0,)}),
    OpSpec("cross_entropy", _ce_inputs, _eager_cross_entropy, "cross_entropy", "liger_cross_entropy", _ce_bytes,
           {"logits": (0,), "target": (0,)}, fused_loss=True),
    OpSpec("fused_linear_cross_entropy", _flce_inputs, _eager_flce, "fused_linear_cross_entropy",
           "liger_fused_linear_cross_entropy", _flce_bytes, {"hidden": (0,), "target": (0,)}, fused_loss=True),
)}
assert tuple(SPECS) == OPS


# --------------------------------------------------------------------------- implementations
# Each resolves to call(**inputs) -> Tensor | tuple of Tensors, or raises ImplUnavailable.


def impls_for(op: str, impls: Sequence[str]) -> List[str]:
    """The impls of ``impls`` that apply to ``op``: the chunk sweep applies to FLCE only."""
    return [impl for impl in impls if impl in IMPLS or (op == FLCE and impl in CHUNK_IMPLS)]


def computes_grad_in_forward(spec: OpSpec, impl: str) -> bool:
    return spec.fused_loss and (impl == "liger" or impl.startswith("optkit"))


def _optkit_call(spec: OpSpec, case: Case, device: torch.device, chunk_rows: Optional[int] = None) -> Callable:
    module_name = f"optkit.kernels.{spec.name}"
    try:
        fn = getattr(importlib.import_module(module_name), spec.optkit_fn)
    except (ImportError, AttributeError) as exc:
        raise ImplUnavailable(f"{module_name}.{spec.optkit_fn} is not importable: {exc}") from None
    params = dict(case.params)
    if spec.name == "rms_norm":
        return lambda x, weight: fn(x, weight, eps=params["eps"], offset=params["offset"],
                                    cast_mode=params["cast_mode"])
    if spec.name in ("cross_entropy", FLCE):
        extra = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
        return lambda **t: fn(**t, ignore_index=IGNORE_INDEX, reduction="mean", softcap=params["softcap"], **extra)
    return lambda **t: fn(**t, **params)


def _eager_call(spec: OpSpec, case: Case, device: torch.device) -> Callable:
    params = dict(case.params)

    def call(**tensors):
        return spec.eager(**tensors, **params)

    return call


def _liger_call(spec: OpSpec, case: Case, device: torch.device) -> Callable:
    if device.type != "cuda":
        raise ImplUnavailable("Liger-Kernel runs on CUDA only")
    try:
        functional = importlib.import_module("liger_kernel.transformers.functional")
    except ImportError as exc:
        raise ImplUnavailable(f"liger-kernel is not importable ({exc}); it is a peer, never a dependency: "
                              "pip install liger-kernel to compare against it") from None
    fn = getattr(functional, spec.liger_fn, None)
    if fn is None:
        raise ImplUnavailable(f"this liger-kernel has no liger_kernel.transformers.functional.{spec.liger_fn}")
    p = case.params
    if spec.name == "rms_norm":
        # in_place left at Liger's default, as LigerRMSNorm users get it (dy is fresh every repeat)
        return lambda x, weight: fn(x, weight, p["eps"], offset=p["offset"], casting_mode=p["cast_mode"])
    if spec.name == "rope":  # Liger wants cos/sin as (1 or B, S, D)
        return lambda q, k, cos, sin: fn(q, k, cos.unsqueeze(0), sin.unsqueeze(0))
    if spec.name == "geglu":
        if p.get("approximate") != "tanh":
            raise ImplUnavailable("Liger's GEGLU computes the tanh approximation only")
        return lambda gate, up: fn(gate, up)
    loss_kwargs = {"ignore_index": IGNORE_INDEX, "reduction": "mean", "softcap": p.get("softcap")}
    if spec.name == "cross_entropy":
        return lambda logits, target: fn(logits, target, **loss_kwargs)
    if spec.name == "fused_linear_cross_entropy":
        return lambda hidden, weight, target: fn(hidden, weight, target, **loss_kwargs)
    return lambda gate, up: fn(gate, up)


class CompileCache:
    """torch.compile of the eager code, one compiled graph per compile group (token dim dynamic).

    ``disabled_reason`` turns the impl into skipped rows; ``backend`` is torch.compile's (tests pass
    a counting backend to check that a token sweep compiles once).
    """

    def __init__(self, disabled_reason: Optional[str] = None, backend: Any = "inductor"):
        self.disabled_reason = disabled_reason
        self.backend = backend
        self._group: Optional[Tuple[str, str]] = None
        self._compiled: Optional[Callable] = None

    def call_for(self, spec: OpSpec, case: Case, device: torch.device) -> Callable:
        if self.disabled_reason:
            raise ImplUnavailable(self.disabled_reason)
        if case.compile_group != self._group:
            torch._dynamo.reset()  # a new feature size must compile static, not turn dynamic
            self._compiled = torch.compile(_eager_call(spec, case, device), backend=self.backend)
            self._group = case.compile_group
        compiled = self._compiled

        def call(**tensors):
            for name, dims in spec.token_dims.items():
                for dim in dims:
                    torch._dynamo.maybe_mark_dynamic(tensors[name], dim)
            return compiled(**tensors)

        return call


def resolve_impl(impl: str, spec: OpSpec, case: Case, device: torch.device, compile_cache: CompileCache) -> Callable:
    if impl == "optkit":
        return _optkit_call(spec, case, device)
    if impl == "eager":
        return _eager_call(spec, case, device)
    if impl == "compile":
        return compile_cache.call_for(spec, case, device)
    if impl == "liger":
        return _liger_call(spec, case, device)
    if impl in CHUNK_IMPLS:
        if spec.name != FLCE:
            raise ImplUnavailable(f"{impl} is {FLCE}'s chunk-size sweep; {spec.name} has no chunks")
        return _optkit_call(spec, case, device, chunk_rows=CHUNK_IMPLS[impl])
    raise ValueError(f"impl {impl!r} unknown; choose one of: {', '.join(ALL_IMPLS)}")


def impl_version(impl: str, env: Dict[str, Any]) -> Optional[str]:
    if impl.startswith("optkit"):
        return env.get("git_sha")
    return {"eager": env.get("torch_version"), "compile": env.get("torch_version"),
            "liger": env.get("liger_kernel_version")}.get(impl)


# --------------------------------------------------------------------------- measuring


def fresh_inputs(master: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Copies of the inputs, leaves again, with the strides of the master copies."""
    return {name: t.detach().clone().requires_grad_(t.requires_grad) for name, t in master.items()}


def as_tuple(out) -> Tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def grad_outputs_like(outs: Tuple[torch.Tensor, ...]) -> Optional[Tuple[torch.Tensor, ...]]:
    """Random upstream gradients for tensor outputs; None (implicit 1) for a scalar loss."""
    if len(outs) == 1 and outs[0].numel() == 1:
        return None
    return tuple(torch.randn_like(o) for o in outs)


def clone_all(grads):
    return None if grads is None else tuple(g.clone() for g in grads)  # dy may be written in place


def _backward(outs, inputs, grad_outputs) -> None:
    wrt = [t for t in inputs.values() if t.requires_grad]
    torch.autograd.grad(outs, wrt, grad_outputs=grad_outputs)


def forward_backward(call: Callable, inputs: Dict[str, torch.Tensor], grad_outputs) -> None:
    """One untimed-by-itself step: a new graph, gradients w.r.t. every differentiable input."""
    _backward(as_tuple(call(**inputs)), inputs, grad_outputs)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_step(call: Callable, master: Dict[str, torch.Tensor]) -> Optional[Tuple[torch.Tensor, ...]]:
    """The first forward+backward (compile / JIT); returns the upstream gradients every later step reuses."""
    inputs = fresh_inputs(master)
    outs = as_tuple(call(**inputs))
    torch.manual_seed(0)
    grad_outputs = grad_outputs_like(outs)
    _backward(outs, inputs, clone_all(grad_outputs))
    return grad_outputs


class L2Flush:
    """Writes a buffer of >= 2x L2 (at least 256 MiB) so each repeat starts from DRAM."""

    def __init__(self, device: torch.device):
        self.nbytes = 0
        self._buffer = None
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
            self.nbytes = max(2 * l2, MIN_FLUSH_BYTES)
            self._buffer = torch.empty(self.nbytes, dtype=torch.int8, device=device)

    def __call__(self) -> None:
        if self._buffer is not None:
            self._buffer.zero_()


@dataclass
class Measurement:
    compile_s: float
    warmup_steps: int
    repeats: int
    fwd_ms: List[float]
    bwd_ms: List[float]
    full_ms: List[float]
    peak_bytes: Optional[int]
    peak_delta_bytes: Optional[int]
    peak_reserved_bytes: Optional[int]


def _peak_memory(call, master, grad_outputs, device) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    if device.type != "cuda":
        return None, None, None
    inputs, grads = fresh_inputs(master), clone_all(grad_outputs)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    forward_backward(call, inputs, grads)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak, peak - before, torch.cuda.max_memory_reserved(device)


def _repeats_for(step_ms: float, settings: Settings) -> int:
    wanted = math.ceil(settings.loop_ms / step_ms) if step_ms > 0 else settings.max_repeats
    return int(min(settings.max_repeats, max(settings.min_repeats, wanted)))


def measure(call: Callable, master: Dict[str, torch.Tensor], device: torch.device, settings: Settings,
            flush: Callable[[], None], timer_factory: Callable[[torch.device], Any] = PhaseTimer) -> Measurement:
    """Warm up, take the memory peak, then time the full loop and the backward-only loop."""
    first = WallClock(device).start()
    grad_outputs = first_step(call, master)
    compile_s = first.stop() / 1e3

    # Warm-up by steps and by time; its mean step (input copies included) sizes the timed loops. Each
    # step is waited for: a host that queues ahead would see 50 ms pass only after the step cap (50
    # steps of a 50 ms op: 2.5 s of warm-up per impl).
    warm = WallClock(device).start()
    warm_started = time.perf_counter()
    steps = 1
    while steps < settings.max_warmup_steps:
        inputs = fresh_inputs(master)
        forward_backward(call, inputs, clone_all(grad_outputs))
        _synchronize(device)
        steps += 1
        enough_time = (time.perf_counter() - warm_started) * 1e3 >= settings.warmup_ms
        if steps >= settings.warmup_steps and enough_time:
            break
    repeats = _repeats_for(warm.stop() / (steps - 1), settings)
    del inputs

    peak, peak_delta, peak_reserved = _peak_memory(call, master, grad_outputs, device)

    full_timer = timer_factory(device)
    for _ in range(repeats):
        inputs, grads = fresh_inputs(master), clone_all(grad_outputs)
        flush()
        full_timer.begin_step()
        outs = as_tuple(call(**inputs))
        full_timer.mark("forward")
        _backward(outs, inputs, grads)
        full_timer.mark("backward")
        full_timer.end_step()
        del inputs, outs, grads
    full = full_timer.results()

    bwd_timer = timer_factory(device)
    for _ in range(repeats):
        inputs, grads = fresh_inputs(master), clone_all(grad_outputs)
        outs = as_tuple(call(**inputs))
        flush()
        bwd_timer.begin_step()
        _backward(outs, inputs, grads)
        bwd_timer.mark("backward")
        bwd_timer.end_step()
        del inputs, outs, grads
    bwd = bwd_timer.results()

    return Measurement(
        compile_s=compile_s, warmup_steps=steps, repeats=repeats,
        fwd_ms=[r["forward_ms"] for r in full], bwd_ms=[r["backward_ms"] for r in bwd],
        full_ms=[r["step_ms"] for r in full], peak_bytes=peak, peak_delta_bytes=peak_delta,
        peak_reserved_bytes=peak_reserved,
    )


def measure_copy_gbps(device: torch.device, timer_factory: Callable[[torch.device], Any] = PhaseTimer,
                      repeats: int = 20) -> float:
    """Device copy bandwidth: median over ``repeats`` copies of a buffer >> L2, read + written bytes."""
    nbytes = COPY_BYTES["cuda" if device.type == "cuda" else "cpu"]
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    timer = timer_factory(device)
    for _ in range(repeats):
        timer.begin_step()
        dst.copy_(src)
        timer.end_step()
    median_ms = percentile(sorted(r["step_ms"] for r in timer.results()), 50)
    return 2 * nbytes / (median_ms * 1e-3) / 1e9


# --------------------------------------------------------------------------- device time (profiler pass)
# Regions are record_function ranges on the host clock, which Kineto also converts device timestamps
# to. A region is entered after a synchronize (inputs copied, L2 flushed) and left after one, so the
# device work that starts inside a region's host interval is that region's work, and only that.

REGION_PREFIX = "optkit.bench/"
PAD_REGION = REGION_PREFIX + "pad"
# Throw-away launches that open every session, plus 2 per earlier session in the process: each new
# session returns one more head record with a foreign timestamp (pytorch/pytorch#192021).
PAD_LAUNCHES = 32
# Device-side events that are not the op's work: the device copies of our region markers (also
# excluded by name), synchronization records (only with Kineto's sync events on), profiler ranges.
NOT_WORK_KINDS = ("gpu_user_annotation", "cuda_sync", "cuda_profiler_range")
PHASES = ("full", "fwd", "bwd")
DEVICE_OVER_EVENTS_TOLERANCE = 1.1  # full_device_ms above this x full_ms is flagged in the table


@dataclass(frozen=True)
class TraceEvent:
    """What the device pass reads of one profiler event (times in us on the profiler's clock)."""

    name: str
    on_device: bool
    start_us: float
    end_us: float
    kind: Optional[str] = None  # Kineto's activity type ("kernel", "gpu_memcpy", ...) where torch has it


class DeviceTraceError(Exception):
    """The trace cannot give this row a device time (records lost, a region missing)."""


def region_name(impl: str, phase: str, index: int) -> str:
    return f"{REGION_PREFIX}{impl}/{phase}/{index}"


def is_device_work(event: TraceEvent) -> bool:
    """A kernel, memcpy or memset (an unknown kind counts: better a visible surplus than a silent gap)."""
    if not event.on_device or event.name.startswith(REGION_PREFIX):
        return False
    return event.kind not in NOT_WORK_KINDS


def busy_ms(intervals: Iterable[Tuple[float, float]]) -> float:
    """Length of the union of (start_us, end_us) intervals, in ms: on one stream, the summed durations."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e3


def device_time_by_region(events: Iterable[TraceEvent]) -> Dict[str, Tuple[float, int]]:
    """Region name -> (busy ms, number of device events) of the device work that started inside it."""
    events = list(events)
    regions = sorted((e.start_us, e.end_us, e.name) for e in events
                     if not e.on_device and e.name.startswith(REGION_PREFIX))
    starts = [start for start, _, _ in regions]
    members: Dict[str, List[Tuple[float, float]]] = {name: [] for _, _, name in regions}
    for e in events:
        if not is_device_work(e):
            continue
        i = bisect.bisect_right(starts, e.start_us) - 1
        if i >= 0 and e.start_us <= regions[i][1]:
            members[regions[i][2]].append((e.start_us, e.end_us))
    return {name: (busy_ms(intervals), len(intervals)) for name, intervals in members.items()}


@dataclass
class DeviceTimes:
    fwd_ms: List[float]
    bwd_ms: List[float]
    full_ms: List[float]
    full_events: List[int]
    uneven_phases: List[str] = field(default_factory=list)  # device-event count varies over repeats


def device_times(regions: Dict[str, Tuple[float, int]], impl: str, repeats: int) -> DeviceTimes:
    """One impl's repeats of every phase, from ``device_time_by_region``; raises DeviceTraceError."""
    by_phase = {}
    for phase in PHASES:
        found = [regions.get(region_name(impl, phase, i)) for i in range(repeats)]
        missing = sum(f is None for f in found)
        if missing:
            raise DeviceTraceError(f"the trace lacks {missing} of {impl}'s {repeats} {phase} regions")
        if any(n_events == 0 for _, n_events in found):
            raise DeviceTraceError(f"a traced {phase} repeat of {impl} holds no device work: "
                                   "the profiler lost its records")
        by_phase[phase] = found
    uneven = [phase for phase, found in by_phase.items() if len({n_events for _, n_events in found}) > 1]
    return DeviceTimes(fwd_ms=[ms for ms, _ in by_phase["fwd"]], bwd_ms=[ms for ms, _ in by_phase["bwd"]],
                       full_ms=[ms for ms, _ in by_phase["full"]], full_events=[n for _, n in by_phase["full"]],
                       uneven_phases=uneven)


def trace_events(function_events: Iterable[Any]) -> List[TraceEvent]:
    """torch.profiler FunctionEvents -> the region markers and device events among them.

    Reads only what torch 2.x has kept stable (name, device_type, time_range; a device event's
    time_range is also what its ``device_time_total`` / older ``cuda_time_total`` report), and
    ``activity_type`` where this torch has it.
    """
    out = []
    for e in function_events:
        on_device = str(e.device_type).rsplit(".", 1)[-1] == "CUDA"
        if on_device or e.name.startswith(REGION_PREFIX):
            kind = getattr(e, "activity_type", None)
            out.append(TraceEvent(e.name, on_device, float(e.time_range.start), float(e.time_range.end),
                                  None if kind is None else str(kind)))
    return out


class ProfilerTrace:
    """One torch.profiler session; CPU activity too, because the region markers are host events."""

    def __init__(self):
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def __enter__(self) -> "ProfilerTrace":
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)

    def region(self, name: str):
        return torch.profiler.record_function(name)

    def events(self) -> List[TraceEvent]:
        return trace_events(self._profile.events())


def _settle(flush: Callable[[], None], device: torch.device) -> None:
    """Before a region: flush L2 and let the device drain, so the region starts idle and cold."""
    flush()
    _synchronize(device)


def trace_phases(trace, impl: str, call: Callable, master: Dict[str, torch.Tensor], grad_outputs,
                 device: torch.device, flush: Callable[[], None], repeats: int) -> None:
    """full, fwd and bwd ``repeats`` times each, as the event pass runs them, one region per repeat."""
    for i in range(repeats):
        inputs, grads = fresh_inputs(master), clone_all(grad_outputs)
        _settle(flush, device)
        with trace.region(region_name(impl, "full", i)):
            forward_backward(call, inputs, grads)
            _synchronize(device)
        del inputs, grads
    for i in range(repeats):
        inputs = fresh_inputs(master)
        _settle(flush, device)
        with trace.region(region_name(impl, "fwd", i)):
            outs = call(**inputs)
            _synchronize(device)
        del inputs, outs
    for i in range(repeats):
        inputs, grads = fresh_inputs(master), clone_all(grad_outputs)
        outs = as_tuple(call(**inputs))
        _settle(flush, device)
        with trace.region(region_name(impl, "bwd", i)):
            _backward(outs, inputs, grads)
            _synchronize(device)
        del inputs, outs, grads


def _pad_session_head(trace, device: torch.device, launches: int) -> None:
    with trace.region(PAD_REGION):
        scratch = torch.zeros(1, device=device)
        for _ in range(launches):
            scratch.add_(1.0)
        _synchronize(device)


# --------------------------------------------------------------------------- rows


def _gbps(nbytes: Optional[int], ms: Optional[float]) -> Optional[float]:
    return None if not nbytes or not ms else nbytes / (ms * 1e-3) / 1e9


def _median(values: Sequence[float]) -> Optional[float]:
    return percentile(sorted(values), 50) if values else None


def fill_measurement(row: Dict[str, Any], m: Measurement, copy_gbps: Optional[float]) -> None:
    """Times, bandwidths and memory of an ok row (row already has bytes_* and flops_full)."""
    stats = summarize(m.full_ms)
    fwd, bwd = _median(m.fwd_ms), _median(m.bwd_ms)
    split_is_meaningful = not row["loss_in_forward"]
    row.update(
        status="ok", compile_s=m.compile_s, warmup_steps=m.warmup_steps, repeats=m.repeats,
        fwd_ms=fwd, bwd_ms=bwd, full_ms=stats["median"], full_ms_p10=stats["p10"], full_ms_p90=stats["p90"],
        full_ms_iqr=stats["iqr"], full_ms_noisy=stats["noisy"],
        full_times_ms=list(m.full_ms), fwd_times_ms=list(m.fwd_ms), bwd_times_ms=list(m.bwd_ms),
        gbps_full=_gbps(row["bytes_full"], stats["median"]),
        gbps_fwd=_gbps(row["bytes_fwd"], fwd) if split_is_meaningful else None,
        gbps_bwd=_gbps(row["bytes_bwd"], bwd) if split_is_meaningful else None,
        peak_bytes=m.peak_bytes, peak_delta_bytes=m.peak_delta_bytes, peak_reserved_bytes=m.peak_reserved_bytes,
    )
    row["frac_of_copy"] = row["gbps_full"] / copy_gbps if row["gbps_full"] and copy_gbps else None
    if row["flops_full"]:
        row["tflops_full"] = row["flops_full"] / (stats["median"] * 1e-3) / 1e12


def fill_device(row: Dict[str, Any], times: DeviceTimes, copy_gbps: Optional[float]) -> None:
    """The device-time fields of an ok row, from its profiled repeats."""
    full = _median(times.full_ms)
    gbps = _gbps(row["bytes_full"], full)
    row.update(
        fwd_device_ms=_median(times.fwd_ms), bwd_device_ms=_median(times.bwd_ms), full_device_ms=full,
        full_device_times_ms=list(times.full_ms), device_repeats=len(times.full_ms),
        n_kernels_full=sorted(times.full_events)[len(times.full_events) // 2], gbps_device=gbps,
        frac_of_copy_device=gbps / copy_gbps if gbps and copy_gbps else None, device_error=None,
    )


def base_row(case: Case, impl: str, dtype_name: str, context: "RunContext") -> Dict[str, Any]:
    spec = SPECS[case.op]
    fwd_bytes, bwd_bytes = spec.bytes_moved(case, DTYPES[dtype_name].itemsize)
    dims = case.dims
    hidden = dims.get("H") or dims.get("I") or dims.get("V") or (dims["Hq"] + dims["Hkv"]) * dims["D"]
    row = empty_kernel_row()
    row.update(context.env_fields)
    params = dict(case.params, **({"chunk_rows": CHUNK_IMPLS[impl]} if impl in CHUNK_IMPLS else {}))
    row.update(
        run_id=context.run_id, op=case.op, impl=impl, impl_version=impl_version(impl, context.env),
        dtype=dtype_name, model=case.model, shape=case.shape, dims=dict(dims), params=params,
        tokens=case.tokens, hidden=hidden, point_key=f"{case.op}/{impl}/{dtype_name}/{case.shape}",
        device=context.device.type, timer="cuda_events" if context.device.type == "cuda" else "host_clock",
        bytes_fwd=fwd_bytes, bytes_bwd=bwd_bytes, bytes_full=fwd_bytes + bwd_bytes,
        flops_full=spec.flops_full(case), copy_gbps=context.copy_gbps, l2_flush_bytes=context.flush.nbytes,
        loss_in_forward=computes_grad_in_forward(spec, impl),
    )
    return row


def _stamp(row: Dict[str, Any]) -> Dict[str, Any]:
    row["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


def _failure(row: Dict[str, Any], status: str, message: str) -> Dict[str, Any]:
    row.update(status=status, error=message)
    return _stamp(row)


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 2000 else text[:2000] + " ..."


def _start_nvml(device: torch.device):
    if device.type != "cuda":
        return None
    from optkit.measure.nvml import NvmlSampler

    index = device.index if device.index is not None else torch.cuda.current_device()
    return NvmlSampler(device_index=index, interval_ms=NVML_INTERVAL_MS).start()


def _fill_nvml(row: Dict[str, Any], sampler) -> None:
    report = sampler.stop() if sampler is not None else None
    if report is None or not report.available:
        return
    row.update(throttled=report.throttled, throttle_reasons=list(report.throttle_reasons_seen),
               sm_clock_mhz_min=report.sm_clock_mhz_min, other_gpu_processes=report.other_processes_at_start)


def _release_after_failure(device: torch.device) -> None:
    """A failed impl may leave cycles (frames, compiled graphs) pinning device memory: collect them.
    Not done after ok rows: gc.collect costs ~0.1-0.5 s with torch loaded, and refcounts free those."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the run


@dataclass
class RunContext:
    run_id: str
    device: torch.device
    env: Dict[str, Any]
    env_fields: Dict[str, Any]
    settings: Settings
    flush: Any
    copy_gbps: Optional[float]
    compile_cache: CompileCache
    timer_factory: Callable[[torch.device], Any] = PhaseTimer
    trace_factory: Optional[Callable[[], Any]] = None  # a profiler session (ProfilerTrace); None: no device pass
    trace_sessions: int = 0  # profiler sessions opened so far in this process
    device_note: Optional[str] = None  # device_error of ok rows until the device pass fills them


def run_impl(case: Case, impl: str, dtype_name: str, master: Dict[str, torch.Tensor],
             context: RunContext) -> Dict[str, Any]:
    """One row; never raises for an implementation that fails (the row says how)."""
    row = base_row(case, impl, dtype_name, context)
    spec = SPECS[case.op]
    failure = None
    sampler = _start_nvml(context.device)
    try:
        call = resolve_impl(impl, spec, case, context.device, context.compile_cache)
        measurement = measure(call, master, context.device, context.settings, context.flush, context.timer_factory)
    except ImplUnavailable as exc:
        failure = ("skipped", str(exc))
    except torch.cuda.OutOfMemoryError as exc:
        failure = ("oom", _error_text(exc))
    except Exception as exc:  # an unsupported shape or a broken kernel is a row, not a crash
        failure = ("error", _error_text(exc))
    finally:
        _fill_nvml(row, sampler)
    if failure is not None:  # outside the except block: its traceback no longer pins tensors
        if failure[0] != "skipped":
            _release_after_failure(context.device)
        return _failure(row, *failure)
    fill_measurement(row, measurement, context.copy_gbps)
    row["device_error"] = context.device_note
    return _stamp(row)


def run_case(case: Case, dtype_name: str, impls: Sequence[str], context: RunContext,
             emit: Callable[[Dict[str, Any]], None]) -> List[Dict[str, Any]]:
    """The event pass of one case: a row per impl, each emitted as it is made; returns them."""
    torch.manual_seed(0)
    master, message, rows = None, None, []
    try:
        master = SPECS[case.op].make_inputs(case, DTYPES[dtype_name], context.device)
    except torch.cuda.OutOfMemoryError as exc:
        message = f"inputs do not fit: {_error_text(exc)}"
    if master is None:
        _release_after_failure(context.device)
        for impl in impls:
            rows.append(_failure(base_row(case, impl, dtype_name, context), "oom", message))
            emit(rows[-1])
        return rows
    for impl in impls:
        rows.append(run_impl(case, impl, dtype_name, master, context))
        emit(rows[-1])
    return rows


def _warm_up_for_trace(case: Case, rows: Sequence[Dict[str, Any]], master: Dict[str, torch.Tensor],
                       context: RunContext, errors: Dict[str, str]) -> List[Tuple[Dict[str, Any], Callable, Any]]:
    """(row, call, grad_outputs) of each impl that warms up again; a failure goes to ``errors``."""
    spec, device = SPECS[case.op], context.device
    traced = []
    for row in rows:
        try:
            call = resolve_impl(row["impl"], spec, case, device, context.compile_cache)
            grad_outputs = first_step(call, master)
            for _ in range(context.settings.device_warmup_steps):
                forward_backward(call, fresh_inputs(master), clone_all(grad_outputs))
            traced.append((row, call, grad_outputs))
        except Exception as exc:  # it ran in the event pass; say what changed rather than stop
            errors[row["impl"]] = f"device pass warm-up: {_error_text(exc)}"
    return traced


def _trace_session(traced, master: Dict[str, torch.Tensor], context: RunContext, pad: int,
                   errors: Dict[str, str]) -> Dict[str, Tuple[float, int]]:
    """One profiler session: the head pad, then every phase of every impl; returns its regions."""
    context.trace_sessions += 1
    with context.trace_factory() as trace:
        _pad_session_head(trace, context.device, pad)
        for row, call, grad_outputs in traced:
            if row["impl"] in errors:
                continue
            try:
                trace_phases(trace, row["impl"], call, master, grad_outputs, context.device, context.flush,
                             context.settings.device_repeats)
            except Exception as exc:
                errors[row["impl"]] = f"device pass: {_error_text(exc)}"
    return device_time_by_region(trace.events())


def measure_device_case(case: Case, dtype_name: str, rows: Sequence[Dict[str, Any]], context: RunContext,
                        log: Callable[[str], None]) -> None:
    """Device times of a case's ok rows: warm each impl up, then trace them all in one session (a second,
    with a longer head pad, if the first lost the whole pad)."""
    torch.manual_seed(0)
    master = SPECS[case.op].make_inputs(case, DTYPES[dtype_name], context.device)
    errors: Dict[str, str] = {}
    traced = _warm_up_for_trace(case, rows, master, context, errors)
    pad = PAD_LAUNCHES + 2 * context.trace_sessions
    regions, pad_seen = {}, 0
    for attempt in range(2 if traced else 0):
        regions = _trace_session(traced, master, context, pad, errors)
        pad_seen = regions.get(PAD_REGION, (0.0, 0))[1]
        if pad_seen:
            break
        log(f"  profiler session {context.trace_sessions} lost all {pad} head launches (pytorch#192021)"
            + ("; tracing the case again with a longer pad" if attempt == 0 else ""))
        pad *= 8
    del traced, master
    if errors:
        _release_after_failure(context.device)
    if 0 < pad_seen < pad:
        log(f"  profiler session {context.trace_sessions}: {pad - pad_seen} of the {pad} head launches came back "
            "without a usable timestamp (pytorch#192021); the head pad absorbed them")
    for row in rows:
        if row["impl"] in errors:
            row["device_error"] = errors[row["impl"]]
        elif pad_seen == 0:
            row["device_error"] = ("two profiler sessions lost their whole head pad (pytorch#192021 or no CUPTI), "
                                   "so the op's own records may be missing too: no device time")
        else:
            try:
                times = device_times(regions, row["impl"], context.settings.device_repeats)
            except DeviceTraceError as exc:
                row["device_error"] = str(exc)
                continue
            fill_device(row, times, context.copy_gbps)
            if times.uneven_phases:  # a deterministic op launches the same kernels every time
                log(f"  {row['point_key']}: device-event count varies over the {'/'.join(times.uneven_phases)} "
                    "repeats (records lost?); the medians are kept")


def run_device_pass(case_rows: Sequence[Tuple[Case, str, List[Dict[str, Any]]]], context: RunContext,
                    log: Callable[[str], None]) -> None:
    """The profiler pass over every case's ok rows (after all event timing: see the module doc)."""
    for case, dtype_name, rows in case_rows:
        ok = [r for r in rows if r["status"] == "ok"]
        if not ok:
            continue
        failure = None
        try:
            measure_device_case(case, dtype_name, ok, context, log)
        except Exception as exc:  # inputs that no longer fit, a profiler that fails: rows keep event times
            failure = f"device pass: {_error_text(exc)}"
        if failure is not None:
            _release_after_failure(context.device)
            for row in ok:
                if row["full_device_ms"] is None:
                    row["device_error"] = failure
        for row in ok:
            timing = (f"device {row['full_device_ms']:.3f} ms, {row['n_kernels_full']} kernels"
                      if row["full_device_ms"] is not None else (row["device_error"] or "")[:100])
            log(f"  {row['point_key']:<60} {timing}")


def _rewrite_rows(path: Path, keep_bytes: int, rows: Sequence[Dict[str, Any]]) -> None:
    """Replace this run's rows (all after the file's first ``keep_bytes``) by their final versions."""
    tmp = path.with_name(path.name + ".tmp")
    with open(path, "rb") as fh:
        tmp.write_bytes(fh.read(keep_bytes))
    for row in rows:
        append_row(tmp, row)
    os.replace(tmp, path)  # atomic: a reader sees the old rows or the new ones


def _env_fields(env: Dict[str, Any]) -> Dict[str, Any]:
    from optkit.measure.env import env_fingerprint, gpu_slug

    return {"gpu_name": env.get("gpu_name"), "gpu_slug": gpu_slug(env), "torch": env.get("torch_version"),
            "triton": env.get("triton_version"), "git_sha": env.get("git_sha"), "git_dirty": env.get("git_dirty"),
            "env_fingerprint": env_fingerprint(env)}


def _write_env(run_dir: Path, env: Dict[str, Any]) -> None:
    import json

    path = run_dir / "env.json"
    if not path.exists():  # the runner writes it first; a standalone run writes it here
        path.write_text(json.dumps(env, indent=2, default=str))


NO_CUDA_REASON = ("no CUDA device: the kernels suite times GPU kernels; run it on a GPU machine "
                  "(scripts/bench_kernels.py --cpu-smoke checks the plumbing on CPU)")
SMOKE_COMPILE_REASON = "torch.compile is not timed in the CPU smoke (inductor's C++ build takes minutes)"
NO_DEVICE_TIME_REASON = "device time needs CUDA (torch.profiler's CUDA activity); this run is on the CPU"
DEVICE_OFF_REASON = "device pass off (device_repeats=0)"
DEVICE_PENDING_REASON = ("device pass not run: it follows every event-timed row (see kernel_suite's doc) "
                         "and this run stopped before it ended")


def _device_note(trace_factory: Optional[Callable[[], Any]], settings: Settings) -> Optional[str]:
    if trace_factory is None:
        return NO_DEVICE_TIME_REASON
    return DEVICE_PENDING_REASON if settings.device_repeats > 0 else DEVICE_OFF_REASON


def run_suite(run_dir: Path, *, run_id: Optional[str] = None, quick: bool = False, ops: Sequence[str] = OPS,
              impls: Sequence[str] = ALL_IMPLS, dtypes: Sequence[str] = ("bfloat16",), device: Optional[str] = None,
              cpu_smoke: bool = False, timer_factory: Callable[[torch.device], Any] = PhaseTimer,
              trace_factory: Optional[Callable[[], Any]] = None, device_repeats: Optional[int] = None,
              env: Optional[Dict[str, Any]] = None, log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Measure every case x dtype x impl: the event pass appends each row to run_dir/results.jsonl as it is
    made; the device pass (CUDA, or a given ``trace_factory``) then fills the device fields and rewrites
    this run's rows. ``device_repeats`` overrides the settings' (0: no device pass)."""
    from optkit.measure.env import capture_env

    bad = sorted(set(impls) - set(ALL_IMPLS)) + sorted(set(dtypes) - set(DTYPES))
    if bad:
        raise ValueError(f"unknown impl/dtype {', '.join(bad)}; impls: {', '.join(ALL_IMPLS)}; "
                         f"dtypes: {', '.join(DTYPES)}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = capture_env() if env is None else env
    _write_env(run_dir, env)
    device = torch.device("cpu" if cpu_smoke else (device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda asked for but CUDA is not available; leave device unset to get skipped rows")
    results_path = run_dir / "results.jsonl"
    keep_bytes = results_path.stat().st_size if results_path.exists() else 0  # earlier runs' rows
    rows: List[Dict[str, Any]] = []

    def emit(row: Dict[str, Any]) -> None:
        append_row(results_path, row)
        rows.append(row)
        timing = f"full {row['full_ms']:.3f} ms" if row["status"] == "ok" else (row["error"] or "")[:100]
        log(f"  {row['point_key']:<60} {row['status']:<7} {timing}")

    cases = smoke_cases(ops) if cpu_smoke else sweep_cases(quick, ops)
    settings = SMOKE_SETTINGS if cpu_smoke else (QUICK_SETTINGS if quick else FULL_SETTINGS)
    if device_repeats is not None:
        settings = dataclasses.replace(settings, device_repeats=device_repeats)
    if trace_factory is None and device.type == "cuda":
        trace_factory = ProfilerTrace
    context = RunContext(
        run_id=run_id or run_dir.name, device=device, env=env, env_fields=_env_fields(env), settings=settings,
        flush=L2Flush(device), copy_gbps=None,
        compile_cache=CompileCache(SMOKE_COMPILE_REASON if cpu_smoke else None), timer_factory=timer_factory,
        trace_factory=trace_factory, device_note=_device_note(trace_factory, settings))
    if device.type != "cuda" and not cpu_smoke:
        for case in cases:
            for dtype_name in dtypes:
                for impl in impls_for(case.op, impls):
                    emit(_failure(base_row(case, impl, dtype_name, context), "skipped", NO_CUDA_REASON))
        return rows

    started = time.time()
    context.copy_gbps = measure_copy_gbps(device, timer_factory)
    log(f"kernels suite: {len(cases)} shapes x {len(dtypes)} dtype(s) x {len(impls)} impls on "
        f"{env.get('gpu_name') or device.type}; copy bandwidth {context.copy_gbps:,.0f} GB/s -> {results_path}")
    case_rows = [(case, dtype_name, run_case(case, dtype_name, impls_for(case.op, impls), context, emit))
                 for case in cases for dtype_name in dtypes]
    event_s = time.time() - started
    if context.device_note != DEVICE_PENDING_REASON:
        log(f"kernels suite: {len(rows)} rows in {event_s:.0f} s; no device pass: {context.device_note}")
        return rows
    log(f"kernels suite: device pass ({settings.device_repeats} profiled repeats per phase)")
    run_device_pass(case_rows, context, log)
    _rewrite_rows(results_path, keep_bytes, rows)
    log(f"kernels suite: {len(rows)} rows in {time.time() - started:.0f} s "
        f"(event pass {event_s:.0f} s, device pass {time.time() - started - event_s:.0f} s)")
    return rows


def run(cfg, run_dir: Path, quick: bool = False) -> List[Dict[str, Any]]:
    """The runner's entry for suite=kernels: bench.device picks the device, bench.run_id the id."""
    bench = cfg.bench
    want = bench.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench.device=cuda but CUDA is not available; use bench.device=auto or a GPU machine")
    device = "cpu" if want == "cpu" else ("cuda" if torch.cuda.is_available() else "cpu")
    return run_suite(Path(run_dir), run_id=bench.run_id or Path(run_dir).name, quick=quick, device=device)


# --------------------------------------------------------------------------- table


def _fmt_ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_pct(fraction: Optional[float]) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def _flags(r: Dict[str, Any]) -> str:
    flags = "".join(f" {flag}" for flag, on in (("noisy", r.get("full_ms_noisy")), ("THROTTLED", r.get("throttled")))
                    if on)
    expected_none = (None, NO_DEVICE_TIME_REASON, DEVICE_OFF_REASON)
    if r.get("full_device_ms") is None and r.get("device_error") not in expected_none:
        flags += " NO-DEVICE-TIME"
    # The kernels cannot run longer than the event window around them: if they seem to, the trace
    # attributed work that is not the op's (a self-check of the device pass; 10% for repeat noise).
    if r.get("full_device_ms") and r["full_device_ms"] > DEVICE_OVER_EVENTS_TOLERANCE * r["full_ms"]:
        flags += " DEVICE>EVENTS"
    if r.get("tflops_full"):  # compute-bound op: GB/s is not its measure
        flags += f" {r['tflops_full']:.0f} TFLOP/s"
    return flags


TABLE_NOTES = (
    "full ms: CUDA events around forward+backward (launch gaps included); p10-p90 of it; x eager: eager's full ms / "
    "the row's\ndev ms: profiler time of the op's kernels, memcpys and memsets alone (median); kern: their number; "
    "%copy ev / dev: bytes_full over full ms / dev ms, as a share of copy bandwidth\n"
    "flags: noisy (IQR > 10% of median), THROTTLED, NO-DEVICE-TIME (see the row's device_error), "
    "DEVICE>EVENTS (dev ms > 1.1 x full ms: the device pass misattributed work)")


def format_table(rows: Iterable[Dict[str, Any]]) -> str:
    """One line per row (rows come grouped by case); "x eager" is eager's full_ms over the row's."""
    rows = list(rows)
    eager_full = {(r["op"], r["shape"], r["dtype"]): r["full_ms"] for r in rows
                  if r["impl"] == "eager" and r["status"] == "ok"}
    header = (f"{'op':<27} {'shape':<34} {'dtype':<8} {'impl':<12} {'fwd ms':>9} {'bwd ms':>9} {'full ms':>9} "
              f"{'p10-p90':>17} {'x eager':>7} {'%copy ev':>8} {'dev ms':>9} {'kern':>5} {'%copy dev':>9} "
              f"{'dpeak MiB':>10}  status")
    lines = [header, "-" * len(header)]
    for r in rows:
        label = f"{r['op']:<27} {r['shape']:<34} {r['dtype']:<8} {r['impl']:<12}"
        if r["status"] != "ok":
            reason = (r["error"] or "").splitlines()[0][:80] if r["error"] else ""
            lines.append(f"{label} {r['status']}: {reason}")
            continue
        base = eager_full.get((r["op"], r["shape"], r["dtype"]))
        speedup = f"{base / r['full_ms']:.2f}" if base else "-"
        star = "*" if r["loss_in_forward"] else " "
        spread = f"{r['full_ms_p10']:.3f}-{r['full_ms_p90']:.3f}"
        kernels = "-" if r.get("n_kernels_full") is None else str(r["n_kernels_full"])
        peak = "-" if r["peak_delta_bytes"] is None else f"{r['peak_delta_bytes'] / 2**20:.1f}"
        lines.append(f"{label} {_fmt_ms(r['fwd_ms']):>8}{star} {_fmt_ms(r['bwd_ms']):>8}{star} "
                     f"{_fmt_ms(r['full_ms']):>9} {spread:>17} {speedup:>7} {_fmt_pct(r['frac_of_copy']):>8} "
                     f"{_fmt_ms(r.get('full_device_ms')):>9} {kernels:>5} {_fmt_pct(r.get('frac_of_copy_device')):>9} "
                     f"{peak:>10}  ok{_flags(r)}")
    if any(r["status"] == "ok" for r in rows):
        lines.append(TABLE_NOTES)
    if any(r.get("loss_in_forward") and r["status"] == "ok" for r in rows):
        lines.append("* gradient computed in forward (fused loss): compare these rows on full ms / dev ms only")
    return "\n".join(lines)


# --------------------------------------------------------------------------- python -m optkit.kernel_suite


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m optkit.kernel_suite --run-dir DIR [--quick] suite=kernels [overrides]`` (the runner's call)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="one shape per op (< 90 s on an H100)")
    args, overrides = parser.parse_known_args(argv)
    from optkit.compose import compose

    cfg = compose(list(overrides) or ["suite=kernels"])
    rows = run(cfg, args.run_dir, quick=args.quick)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
