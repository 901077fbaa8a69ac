"""pytest-benchmark micro-suite: one forward+backward of each op x implementation (the forward alone
for a forward-only op: nf4_dequantize).

Not part of the main test run (pyproject's testpaths = tests); run it explicitly:

    pytest suites/ --benchmark-only --benchmark-autosave            # store a baseline
    pytest suites/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

What it is for: pytest-benchmark's stored-run comparison as a quick gate on kernel times (time is
"larger is worse" here, which is what its compare assumes). The numbers of record (CUDA events,
fwd/bwd split, GB/s, memory) come from ``optkit bench suite=kernels``; this suite reuses that
suite's shapes, inputs and implementations (optkit/bench/kernels/cases.py, impls.py) so the two cannot
drift.

Timing is pytest-benchmark's host clock around one step that ends in ``torch.cuda.synchronize``;
the setup of every round (untimed) copies fresh inputs, flushes L2 and synchronizes, so a round
starts with an idle GPU and a cold cache. With a GPU: the quick shapes (one per op, Llama-3-8B
first). Without one: the tiny CPU smoke shapes (eager and optkit under the Triton interpreter). The
implementations are every op's and the peers of one op (bitsandbytes for nf4_dequantize); FLCE's
chunk-size sweep stays in the kernels suite.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must precede the first triton import (the kernels' modules import it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from optkit.bench.kernels import cases as kernel_cases  # noqa: E402
from optkit.bench.kernels import impls as kernel_impls  # noqa: E402
from optkit.bench.kernels import ops as kernel_ops  # noqa: E402
from optkit.bench.kernels import rows as kernel_rows  # noqa: E402
from optkit.measure import device_timing  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = "bfloat16"
CASES = kernel_cases.sweep_cases(quick=True) if HAS_CUDA else kernel_cases.smoke_cases()
# Rounds: pytest-benchmark keeps every round; 30 medians out GPU noise, 3 keep the CPU smoke short.
ROUNDS, WARMUP_ROUNDS = (30, 5) if HAS_CUDA else (3, 1)
IMPLS = kernel_impls.IMPLS + (kernel_impls.BITSANDBYTES,)
POINTS = [(case, impl) for case in CASES for impl in kernel_impls.impls_for(case.op, IMPLS)]

_compile_cache = kernel_impls.CompileCache(None if HAS_CUDA else kernel_rows.SMOKE_COMPILE_REASON)
_flush = device_timing.L2Flush(DEVICE)


def _sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("case, impl", POINTS, ids=[f"{c.op}-{c.shape}-{impl}" for c, impl in POINTS])
def test_forward_backward(benchmark, case, impl):
    spec = kernel_ops.SPECS[case.op]
    dtype = kernel_cases.DTYPES[DTYPE]
    try:
        call = kernel_impls.resolve_impl(impl, spec, case, DEVICE, _compile_cache, dtype)
        torch.manual_seed(0)
        master = spec.make_inputs(case, dtype, DEVICE)
    except (kernel_impls.ImplUnavailable, kernel_cases.InputsUnavailable) as exc:
        pytest.skip(str(exc))
    first = device_timing.fresh_inputs(master)
    outs = device_timing.as_tuple(call(**first))  # also the compile / JIT call
    grad_outputs = None if spec.forward_only else device_timing.grad_outputs_like(outs)
    del first, outs

    def setup():
        inputs, grads = device_timing.fresh_inputs(master), device_timing.clone_all(grad_outputs)
        _flush()
        _sync()
        return (inputs, grads), {}

    def step(inputs, grads):
        if spec.forward_only:
            call(**inputs)
        else:
            device_timing.forward_backward(call, inputs, grads)
        _sync()

    fwd_bytes, bwd_bytes = spec.bytes_moved(case, dtype.itemsize)
    benchmark.group = f"{case.op}/{DTYPE}/{case.shape}"
    benchmark.extra_info.update(
        op=case.op,
        impl=impl,
        shape=case.shape,
        dtype=DTYPE,
        bytes_full=fwd_bytes + (bwd_bytes or 0),
        forward_only=spec.forward_only,
        loss_in_forward=kernel_impls.computes_grad_in_forward(spec, impl),
    )
    benchmark.pedantic(step, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
