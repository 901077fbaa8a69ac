"""Is a training step bound by the host (Python + launches) or by the GPU? Prints markdown tables.

    python scripts/gpu_host_overhead.py --json out.json --cprofile-dir prof/ \\
        --point "model=llama3_8b train.method=qlora opt=full train.checkpointing=standard" ...

Per --point (composed like the runner's overrides, built by optkit.bench.point.build_training, so the model,
patches, checkpointing and optimizer are exactly a measured point's):
- runner-like: --steps steps queued back to back, CUDA events around each (the runner's step time);
- isolated: each step alone (synchronize before and after): host time until the step's last launch
  returned (``enqueue``) vs until the GPU finished (``done``). enqueue/done near 1 means the GPU waits
  on the host: the step is host-bound and launch overhead, not kernels, sets its time;
- GPU busy: union of kernel/memcpy/memset intervals of one step in a torch.profiler region (optkit's
  measure/device_trace, as the kernel suite's device pass);
  ``idle`` = 1 - busy / done is the share of the step the GPU sat waiting;
- device syncs per step, and (with --cprofile-dir) a cProfile of 2 steps, top functions by own time.
--micro also times the host cost of single calls (small tensors, so launches dominate).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from optkit.config.compose import compose  # noqa: E402
from optkit.measure.device_trace import (  # noqa: E402
    PAD_LAUNCHES, REGION_PREFIX, ProfilerTrace, device_time_by_region, pad_session_head)
from optkit.bench.point import (  # noqa: E402
    _count_syncs, _one_step, _release_setup_cache, _timed_steps, _warmup, build_training)
from scripts._tables import table  # noqa: E402

DEVICE = torch.device("cuda")
STEP_REGION = REGION_PREFIX + "host_overhead/step"


def _sync() -> None:
    torch.cuda.synchronize(DEVICE)


def runner_like(model, optimizer, batches, steps: int) -> List[float]:
    """The runner's own timed steps (optkit.bench.point: back to back, CUDA events per step)."""
    return [r["step_ms"] for r in _timed_steps(model, optimizer, batches, 0, steps, DEVICE, [])]


def isolated(model, optimizer, batches, steps: int) -> Dict[str, List[float]]:
    enqueue, done = [], []
    for i in range(steps):
        _sync()
        t0 = time.perf_counter()
        _one_step(model, optimizer, batches[i % len(batches)])
        t1 = time.perf_counter()
        _sync()
        t2 = time.perf_counter()
        enqueue.append((t1 - t0) * 1e3)
        done.append((t2 - t0) * 1e3)
    return {"enqueue": enqueue, "done": done}


def gpu_busy_ms(model, optimizer, batch) -> float:
    """Union of one step's kernel/memcpy/memset intervals (the kernel suite's device-time machinery)."""
    _sync()
    with ProfilerTrace() as trace:
        pad_session_head(trace, DEVICE, PAD_LAUNCHES)
        with trace.region(STEP_REGION):
            _one_step(model, optimizer, batch)
            _sync()
    return device_time_by_region(trace.events())[STEP_REGION][0]


def cprofile_steps(model, optimizer, batches, path: str, n: int = 2) -> str:
    prof = cProfile.Profile()
    _sync()
    prof.enable()
    for i in range(n):
        _one_step(model, optimizer, batches[i % len(batches)])
    _sync()
    prof.disable()
    prof.dump_stats(path)
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).sort_stats("tottime")
    stats.print_stats(45)
    out.write("\n\n==== by cumulative time ====\n")
    stats.sort_stats("cumulative").print_stats(60)
    return out.getvalue()


def measure_point(spec: str, steps: int, cprofile_dir: str | None) -> Dict[str, object]:
    overrides = spec.split()
    cfg = compose(overrides)
    model, optimizer, batches, _ = build_training(cfg, DEVICE)
    _release_setup_cache(DEVICE)
    _warmup(model, optimizer, batches, cfg.train.warmup_steps, DEVICE, [])
    runner = runner_like(model, optimizer, batches, steps)
    iso = isolated(model, optimizer, batches, steps)
    row: Dict[str, object] = {"point": spec, "runner_step_ms": statistics.median(runner), "runner_steps_ms": runner,
                              "enqueue_ms": statistics.median(iso["enqueue"]), "done_ms": statistics.median(iso["done"]),
                              "isolated": iso, "syncs_per_step": _count_syncs(model, optimizer, batches[0])}
    busy = [gpu_busy_ms(model, optimizer, batches[i % len(batches)]) for i in range(2)]
    row["gpu_busy_ms"] = min(busy)
    row["idle_share"] = 1 - row["gpu_busy_ms"] / row["done_ms"]
    if cprofile_dir:
        os.makedirs(cprofile_dir, exist_ok=True)
        name = "_".join(o.split("=")[-1] for o in overrides)[:120]
        text = cprofile_steps(model, optimizer, batches, os.path.join(cprofile_dir, f"{name}.pstats"))
        with open(os.path.join(cprofile_dir, f"{name}.txt"), "w") as f:
            f.write(text)
    del model, optimizer, batches
    torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- single calls
def host_us(fn: Callable[[], object], calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    _sync()
    return (t1 - t0) / calls * 1e6


def micro() -> Dict[str, float]:
    import torch.nn.functional as F

    import importlib

    rn = importlib.import_module("optkit.kernels.rms_norm")  # the package re-exports functions of these names
    sw = importlib.import_module("optkit.kernels.swiglu")

    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    lin = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    cases = {
        "torch.empty": lambda: torch.empty(8, 4096, device="cuda"),
        "x + x (one aten kernel)": lambda: x + x,
        "F.linear (8x4096 @ 4096x64)": lambda: F.linear(x, lin),
        "optkit rms_norm fwd launcher (triton launch)": lambda: rn._rms_norm_fwd(x, w, 1e-5, 0.0, True),
        "optkit rms_norm() (autograd.Function, no grad)": lambda: rn.rms_norm(x, w, 1e-5),
        "torch.ops.optkit.rms_norm_fwd (custom op)": lambda: torch.ops.optkit.rms_norm_fwd(x, w, 1e-5, 0.0, True),
        "optkit swiglu fwd launcher": lambda: sw._swiglu_fwd(x, x),
        "torch.ops.optkit.swiglu_fwd (custom op)": lambda: torch.ops.optkit.swiglu_fwd(x, x),
        "F.rms_norm (aten)": lambda: F.rms_norm(x, (4096,), w, 1e-5),
    }
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import dequantize_4bit

        from optkit.kernels.nf4_dequantize import nf4_dequantize

        layer = bnb.nn.Linear4bit(4096, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=True).to("cuda")
        qs = layer.weight.quant_state
        cases["optkit nf4_dequantize (64x4096)"] = lambda: nf4_dequantize(layer.weight, qs, torch.bfloat16)
        cases["bnb dequantize_4bit (64x4096)"] = lambda: dequantize_4bit(layer.weight, qs)
    except Exception as exc:  # noqa: BLE001 - the other cases still say something
        print(f"nf4 micro cases skipped: {exc}")
    results = {}
    with torch.no_grad():
        for name, fn in cases.items():
            try:
                results[name] = host_us(fn)
            except Exception as exc:  # noqa: BLE001 - one broken case keeps the others
                print(f"micro case {name!r} failed: {type(exc).__name__}: {exc}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", action="append", default=[], help="space-separated overrides (repeatable)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro", action="store_true")
    parser.add_argument("--cprofile-dir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out: Dict[str, object] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.micro:
        out["micro_us"] = micro()
        table("host time per call", ["call", "host us/call"], [[k, v] for k, v in out["micro_us"].items()])
    rows = []
    for spec in args.point:
        try:
            rows.append(measure_point(spec, args.steps, args.cprofile_dir))
        except Exception as exc:  # noqa: BLE001 - one failing point keeps the others
            rows.append({"point": spec, "error": f"{type(exc).__name__}: {exc}"})
        r = rows[-1]
        print(json.dumps({k: v for k, v in r.items() if k not in ("isolated", "runner_steps_ms")}), flush=True)
    out["points"] = rows
    table("host-bound or GPU-bound", ["point", "runner step ms", "enqueue ms", "done ms", "GPU busy ms", "GPU idle",
                                      "syncs"],
          [[r["point"], *(r[k] for k in ("runner_step_ms", "enqueue_ms", "done_ms", "gpu_busy_ms")),
            f"{r['idle_share']:.0%}", r["syncs_per_step"]] for r in rows if "error" not in r])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
