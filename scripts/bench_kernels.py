#!/usr/bin/env python
"""Per-op kernel benchmark, standalone: optkit vs eager vs torch.compile vs Liger-Kernel.

    python scripts/bench_kernels.py --out DIR [--quick] [--ops rms_norm,rope] [--impls optkit,eager]
                                    [--fp32] [--device-repeats N] [--cpu-smoke]

Writes DIR/env.json and DIR/results.jsonl (one row per op x shape x dtype x impl; see
optkit/bench/kernels/rows.py for the fields, optkit/bench/kernels/cases.py for the byte model and the two times: CUDA-event time with
launch gaps, and profiler device time of the kernels alone) and prints a table. The same
measurement runs under ``optkit bench suite=kernels``. A full run takes < 5 min on an H100,
``--quick`` (one shape per op) < 90 s. ``--cpu-smoke`` times tiny shapes on the CPU with the host
clock and the Triton interpreter: a plumbing check, not a measurement (no device time).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def _csv(text: str) -> list:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="run directory (env.json, results.jsonl)")
    parser.add_argument("--quick", action="store_true", help="one shape per op")
    parser.add_argument("--ops", type=_csv, default=None, help="comma list of ops (default: all)")
    parser.add_argument("--impls", type=_csv, default=None,
                        help="comma list of optkit,eager,compile,liger and FLCE's optkit-c256,optkit-c512,optkit-c2048")
    parser.add_argument("--fp32", action="store_true", help="also measure float32 inputs")
    parser.add_argument("--device-repeats", type=int, default=None,
                        help="profiled repeats per phase for device time (default 5; 0 skips the device pass)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, host clock")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:  # before triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from optkit.bench.kernels import cases as kernel_cases
    from optkit.bench.kernels import impls as kernel_impls
    from optkit.bench.kernels import run as kernel_run
    from optkit.bench.kernels import table as kernel_table

    if (args.out / "results.jsonl").exists():
        print(f"{args.out / 'results.jsonl'} exists; pass a new --out directory so runs are not mixed",
              file=sys.stderr)
        return 2
    rows = kernel_run.run_suite(args.out, quick=args.quick, ops=args.ops or kernel_cases.OPS, impls=args.impls or kernel_impls.ALL_IMPLS,
                        dtypes=("bfloat16", "float32") if args.fp32 else ("bfloat16",), cpu_smoke=args.cpu_smoke,
                        device_repeats=args.device_repeats)
    print()
    print(kernel_table.format_table(rows))
    statuses = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "oom", "error")}
    print(f"\n{len(rows)} rows ({', '.join(f'{n} {s}' for s, n in statuses.items() if n)}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
