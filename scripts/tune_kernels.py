"""Sweep the launch configs of optkit's RMSNorm and RoPE kernels on a GPU, as a share of copy bandwidth.

For every RMSNorm / RoPE shape of the kernels suite (optkit/bench/kernels/cases.py: Llama-3-8B, Qwen3-8B,
Gemma-2-9B widths at 1k, 4k and 16k tokens, bf16), each config of a small grid plus the shape's default
is launched directly (the raw launchers, no autograd) and timed with CUDA events, median of ``--repeats``,
each repeat from a cold L2 (measure/device_timing.L2Flush). GB/s come from the kernels suite's byte model
and are set beside the copy bandwidth measured in the same process (device_timing.measure_copy_gbps), so
"%copy" reads like the suite's frac_of_copy_device. What is swept:

- rms_norm forward: rows per program x warps; backward: the same x programs per SM (its persistent grid).
- rope forward: heads per tile x warps x tokens per program, out of place; then, for the default and the
  fastest forward config only, the backward (the same kernel rotating by -sin, so it ranks the same) and
  the in-place forward (q and k written over themselves, as ``apply_rotary(..., inplace=True)``).

A config whose compile fails (too many registers, shared memory) is a line saying so, never a stop.
Defaults are marked ``*``, the fastest of each (op, shape, pass) ``<``. Nothing is autotuned at import:
the sweep runs only here, and the winners go into default_rms_norm_launch / default_rope_launch by hand.

  python scripts/tune_kernels.py [--ops rms_norm,rope] [--tokens 1024,4096,16384] [--repeats 30] [--json F]
  python scripts/tune_kernels.py --cpu-smoke      # tiny shapes, host clock, Triton interpreter: plumbing only
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

# Each grid holds the default's values and their neighbours: 8 warps is what warps_for gives a 4096-element
# tile; 1 row / 1 token per program is the default, 2-4 amortize a program's start over more bytes.
RMS_FWD_GRID = {"rows_per_program": (1, 2, 4), "num_warps": (4, 8, 16)}
RMS_BWD_GRID = {"rows_per_program": (1, 2, 4), "num_warps": (4, 8, 16), "programs_per_sm": (2, 4, 8)}
# Each RoPE config costs one more Triton compile per head_dim, so the grid stays at 18.
ROPE_GRID = {"max_heads_per_tile": (8, 16, 32), "num_warps": (4, 8, 16), "tokens_per_program": (1, 2)}
SMOKE_GRIDS = {
    "rms_fwd": {"rows_per_program": (1, 2), "num_warps": (1,)},
    "rms_bwd": {"rows_per_program": (2,), "num_warps": (1,), "programs_per_sm": (2,)},
    "rope": {"max_heads_per_tile": (2,), "num_warps": (1,), "tokens_per_program": (1, 3)},
}


def grid(axes: Dict[str, Sequence[int]]) -> List[Dict[str, int]]:
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def time_ms(
    fn: Callable[[], Any], device: torch.device, repeats: int, flush: Callable[[], None], timer_factory
) -> float:
    """Median event time of ``fn`` over ``repeats`` calls, each after an L2 flush (two untimed calls first)."""
    from optkit.measure.device_timing import synchronize
    from optkit.measure.stats import percentile

    for _ in range(2):
        fn()
    synchronize(device)
    timer = timer_factory(device)
    for _ in range(repeats):
        flush()
        timer.begin_step()
        fn()
        timer.end_step()
    return percentile(sorted(r["step_ms"] for r in timer.results()), 50)


class Sweep:
    """Times configs of one shape and collects result lines (dicts) for the table and the JSON."""

    def __init__(self, device, repeats, copy_gbps, timer_factory, flush, case, dtype_name):
        self.device, self.repeats, self.copy_gbps = device, repeats, copy_gbps
        self.timer_factory, self.flush = timer_factory, flush
        self.case, self.dtype_name = case, dtype_name
        self.lines: List[Dict[str, Any]] = []

    def run(self, kernel_pass: str, config: Dict[str, int], is_default: bool, nbytes: int, fn) -> Optional[float]:
        line = {"op": self.case.op, "shape": self.case.shape, "tokens": self.case.tokens, "dtype": self.dtype_name}
        line.update(kernel_pass=kernel_pass, config=config, default=is_default, ms=None, pct_copy=None, error=None)
        try:
            line["ms"] = time_ms(fn, self.device, self.repeats, self.flush, self.timer_factory)
            line["pct_copy"] = 100 * nbytes / (line["ms"] * 1e-3) / 1e9 / self.copy_gbps
        except Exception as exc:  # a config this GPU cannot compile or run is a line, not a stop
            line["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        self.lines.append(line)
        return line["ms"]


def with_default(launches: List[Any], default: Any) -> List[Any]:
    """The grid's launches, the default first when the grid lacks it (so every shape has its reference)."""
    return launches if default in launches else [default, *launches]


def sweep_rms_norm(sweep: Sweep, inputs: Dict[str, torch.Tensor], grids) -> None:
    from optkit.bench.kernels.ops import SPECS
    from optkit.kernels._launch import PROGRAMS_PER_SM
    from optkit.kernels.rms_norm import RmsNormLaunch, default_rms_norm_launch, launch_rms_norm_bwd, launch_rms_norm_fwd

    case = sweep.case
    x, weight = inputs["x"].detach(), inputs["weight"].detach()
    eps, offset, cast = case.params["eps"], case.params["offset"], case.params["cast_mode"] == "llama"
    fwd_bytes, bwd_bytes = SPECS["rms_norm"].bytes_moved(case, x.element_size())
    default = default_rms_norm_launch(*x.reshape(-1, x.shape[-1]).shape)
    _, rstd = launch_rms_norm_fwd(x, weight, eps, offset, cast)
    dy = torch.randn_like(x)
    for launch in with_default([RmsNormLaunch(**c) for c in grid(grids["rms_fwd"])], default):
        fn = lambda: launch_rms_norm_fwd(x, weight, eps, offset, cast, launch)  # noqa: E731
        config = {k: v for k, v in asdict(launch).items() if k != "programs_per_sm"}  # the backward's only
        sweep.run("fwd", config, launch == default, fwd_bytes, fn)
    default_bwd = replace(default, programs_per_sm=PROGRAMS_PER_SM)  # None means PROGRAMS_PER_SM in the op
    for launch in with_default([RmsNormLaunch(**c) for c in grid(grids["rms_bwd"])], default_bwd):
        fn = lambda: launch_rms_norm_bwd(dy, x, weight, rstd, offset, cast, True, launch)  # noqa: E731
        sweep.run("bwd", asdict(launch), launch == default_bwd, bwd_bytes, fn)


def sweep_rope(sweep: Sweep, inputs: Dict[str, torch.Tensor], grids) -> None:
    from optkit.bench.kernels.ops import SPECS
    from optkit.kernels.rope import RopeLaunch, default_rope_launch, launch_rope

    q, k = inputs["q"].detach(), inputs["k"].detach()
    cos, sin = inputs["cos"].unsqueeze(0), inputs["sin"].unsqueeze(0)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    fwd_bytes, bwd_bytes = SPECS["rope"].bytes_moved(sweep.case, q.element_size())
    default = default_rope_launch(q.shape[1], k.shape[1], q.shape[-1])
    timed = {}
    for launch in with_default([RopeLaunch(**c) for c in grid(grids["rope"])], default):
        fn = lambda: launch_rope(q, k, cos, sin, q_out, k_out, False, launch)  # noqa: E731
        timed[launch] = sweep.run("fwd", asdict(launch), launch == default, fwd_bytes, fn)
    finished = {launch: ms for launch, ms in timed.items() if ms is not None}
    fastest = [min(finished, key=finished.get)] if finished else []
    for launch in dict.fromkeys([default, *fastest]):  # the backward and in-place runs of these two only
        config = asdict(launch)
        sweep.run(
            "bwd", config, launch == default, bwd_bytes, lambda: launch_rope(q, k, cos, sin, q_out, k_out, True, launch)
        )
        sweep.run(
            "fwd in place",
            config,
            launch == default,
            fwd_bytes,
            lambda: launch_rope(q, k, cos, sin, q, k, False, launch),
        )


def _key(line: Dict[str, Any]) -> tuple:
    return line["op"], line["shape"], line["kernel_pass"]


def format_lines(lines: Sequence[Dict[str, Any]], copy_gbps: float) -> str:
    """The table, then one line per (op, shape, pass) whose fastest config beats its default."""
    fastest: Dict[tuple, Dict[str, Any]] = {}
    defaults: Dict[tuple, Dict[str, Any]] = {}
    for line in (x for x in lines if x["ms"] is not None):
        if _key(line) not in fastest or line["ms"] < fastest[_key(line)]["ms"]:
            fastest[_key(line)] = line
        if line["default"]:
            defaults[_key(line)] = line
    out = [f"copy bandwidth {copy_gbps:,.0f} GB/s; * default, < fastest of its (op, shape, pass)"]
    out.append(f"{'op':<9} {'shape':<28} {'pass':<13} {'config':<58} {'ms':>8} {'%copy':>6}")
    for line in lines:
        config = " ".join(f"{k}={v}" for k, v in line["config"].items())
        head = f"{line['op']:<9} {line['shape']:<28} {line['kernel_pass']:<13} {config:<58}"
        if line["ms"] is None:
            out.append(f"{head} {line['error']}")
            continue
        marks = ("*" if line["default"] else "") + ("<" if fastest[_key(line)] is line else "")
        out.append(f"{head} {line['ms']:>8.4f} {line['pct_copy']:>5.0f}% {marks}")
    out.append("\nwhere a config beats the default:")
    for key, best in fastest.items():
        default = defaults.get(key)
        if default is not None and best is not default:
            config = " ".join(f"{k}={v}" for k, v in best["config"].items())
            out.append(
                f"  {' '.join(map(str, key))}: {default['pct_copy']:.0f}% -> {best['pct_copy']:.0f}% of copy "
                f"({default['ms'] / best['ms']:.2f}x) with {config}"
            )
    return "\n".join(out)


def run(ops, tokens, repeats, device, cpu_smoke=False, log=print) -> Dict[str, Any]:
    from optkit.bench.kernels.cases import DTYPES, smoke_cases, sweep_cases
    from optkit.bench.kernels.ops import SPECS
    from optkit.measure.device_timing import L2Flush, measure_copy_gbps
    from optkit.measure.timing import PhaseTimer

    dtype_name = "float32" if cpu_smoke else "bfloat16"
    cases = smoke_cases(ops) if cpu_smoke else [c for c in sweep_cases(False, ops) if c.tokens in tokens]
    grids = SMOKE_GRIDS if cpu_smoke else {"rms_fwd": RMS_FWD_GRID, "rms_bwd": RMS_BWD_GRID, "rope": ROPE_GRID}
    copy_gbps = measure_copy_gbps(device)
    flush = L2Flush(device)
    lines: List[Dict[str, Any]] = []
    for case in cases:
        torch.manual_seed(0)
        inputs = SPECS[case.op].make_inputs(case, DTYPES[dtype_name], device)
        sweep = Sweep(device, repeats, copy_gbps, PhaseTimer, flush, case, dtype_name)
        (sweep_rms_norm if case.op == "rms_norm" else sweep_rope)(sweep, inputs, grids)
        log(f"  {case.op} {case.shape}: {len(sweep.lines)} configs timed")
        lines.extend(sweep.lines)
        del inputs, sweep
    return {
        "copy_gbps": copy_gbps,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "lines": lines,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", default="rms_norm,rope", help="comma list of rms_norm, rope")
    parser.add_argument("--tokens", default="1024,4096,16384", help="comma list of the suite's token counts")
    parser.add_argument("--repeats", type=int, default=30, help="timed launches per config (median)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the plumbing only")
    args = parser.parse_args(argv)
    ops = tuple(op for op in args.ops.split(",") if op)
    unknown = sorted(set(ops) - {"rms_norm", "rope"})
    if unknown:
        print(f"--ops {','.join(unknown)} not tunable here; choose from rms_norm, rope", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, repeats = torch.device("cpu"), 2
    elif not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU (or --cpu-smoke to check the plumbing)", file=sys.stderr)
        return 2
    else:
        device, repeats = torch.device("cuda"), args.repeats
    tokens = tuple(int(t) for t in args.tokens.split(",") if t)
    result = run(ops, tokens, repeats, device, cpu_smoke=args.cpu_smoke)
    print(format_lines(result["lines"], result["copy_gbps"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
