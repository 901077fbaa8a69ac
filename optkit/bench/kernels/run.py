"""Per-op kernel benchmark (``optkit bench suite=kernels``): optkit's Triton kernels side by side with
eager PyTorch, torch.compile of that eager code, Liger-Kernel and bitsandbytes, at published model shapes.

One row per op x shape x dtype x implementation (fields: ``KERNEL_ROW_FIELDS``), all in one process.
Two times per phase (forward, backward, forward+backward = "full"; a forward-only op's one phase, its
forward, is its "full"), from two separate passes, and a third of the full phase:

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
- graph time (``graph_ms``, of the full phase): right after a row's event loops, the same call
  captured once into a CUDA graph and replayed, event-timed from a cold L2. A replay launches the whole
  sequence at once, so host cost is gone but the device's gaps between kernels stay; ``launch_bound``
  marks rows whose event time is >= 1.25x it (the host, not the kernels, sets their event time). A call
  that syncs with the host cannot be captured: ``graph_error`` says so and the row keeps its other times.

Both passes: L2 flushed before every repeat by writing a buffer of at least 2x the L2 size (in the
device pass, before the traced region, which therefore never contains the flush); every repeat gets
fresh copies of the inputs (an implementation that writes into its inputs, as Liger's cross entropy
stores the gradient in the logits, cannot skew the next repeat) and builds its own autograd graph;
gradients come from ``torch.autograd.grad`` w.r.t. every differentiable input (weights included), so
nothing accumulates and no graph is replayed with retain_graph.

The device pass comes last (device_pass.py says why). The rows are appended to results.jsonl as the event
pass makes them (a killed run keeps them, with ``device_error`` saying that the device pass did not run) and
rewritten in place, device times filled, when the device pass ends. Device time needs CUDA: on the CPU its
fields are None.

The suite's parts, one job each, in optkit/bench/kernels/: cases.py (which op at which shape), ops.py (each
op's inputs, eager baseline and byte model, byte_model.py), impls.py (optkit / eager / compile / liger /
bitsandbytes callables), rows.py (row fields and filling them), phases.py (forward+backward or forward-only
steps of both passes), device_pass.py (the profiler pass), table.py (the printed table); timing itself is
optkit/measure/device_timing.py's (events, L2 flush, copy bandwidth) and device_trace.py's (profiler device
time). This module runs them: the event pass, then the device pass, results.jsonl and the command line.

Entry points: ``run(cfg, run_dir)`` (the runner: ``optkit bench suite=kernels`` calls
``python -m optkit.bench.kernels.run --config``), ``main()`` (the same command line without a config:
a standalone run, a subset of ops / impls / dtypes, the CPU smoke), ``run_suite(...)`` (tests, the
other two) and ``format_table(rows)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from optkit.bench.kernels.cases import DTYPES, OPS, Case, InputsUnavailable, smoke_cases, sweep_cases
from optkit.bench.kernels.context import RunContext, error_text, release_after_failure
from optkit.bench.kernels.device_pass import run_device_pass
from optkit.bench.kernels.impls import ALL_IMPLS, CompileCache, ImplUnavailable, impls_for, resolve_impl
from optkit.bench.kernels.ops import SPECS
from optkit.bench.kernels.phases import phases_of
from optkit.bench.kernels.rows import (
    DEVICE_OFF_REASON,
    DEVICE_PENDING_REASON,
    NO_CUDA_REASON,
    NO_DEVICE_TIME_REASON,
    SMOKE_COMPILE_REASON,
    base_row,
    failure_row,
    fill_graph,
    fill_measurement,
    fill_nvml,
    stamp_row,
    start_nvml,
)
from optkit.bench.kernels.table import format_table
from optkit.measure.device_timing import GraphUnavailable, L2Flush, Settings, measure_copy_gbps, measure_graph
from optkit.measure.device_trace import (
    ProfilerTrace,
)
from optkit.measure.timing import PhaseTimer
from optkit.results.rows import append_row, env_stamp

FULL_SETTINGS = Settings()
QUICK_SETTINGS = Settings(warmup_steps=2, warmup_ms=20.0, loop_ms=60.0, min_repeats=10, max_repeats=50)
SMOKE_SETTINGS = Settings(
    warmup_steps=1, warmup_ms=0.0, loop_ms=0.0, min_repeats=3, max_repeats=3, device_repeats=2, device_warmup_steps=1
)


# --------------------------------------------------------------------------- the run


def run_impl(
    case: Case, impl: str, dtype_name: str, master: Dict[str, torch.Tensor], context: RunContext
) -> Dict[str, Any]:
    """One row; never raises for an implementation that fails (the row says how)."""
    row = base_row(case, impl, dtype_name, context)
    spec = SPECS[case.op]
    failure = None
    sampler = start_nvml(context.device)
    try:
        call = resolve_impl(impl, spec, case, context.device, context.compile_cache, DTYPES[dtype_name])
        measurement = phases_of(spec).measure(
            call, master, context.device, context.settings, context.flush, context.timer_factory
        )
    except ImplUnavailable as exc:
        failure = ("skipped", str(exc))
    except torch.cuda.OutOfMemoryError as exc:
        failure = ("oom", error_text(exc))
    except Exception as exc:  # an unsupported shape or a broken kernel is a row, not a crash
        failure = ("error", error_text(exc))
    finally:
        fill_nvml(row, sampler)
    if failure is not None:  # outside the except block: its traceback no longer pins tensors
        if failure[0] != "skipped":
            release_after_failure(context.device)
        return failure_row(row, *failure)
    fill_measurement(row, measurement, context.copy_gbps)
    fill_graph(row, *_graph_times(call, master, spec, context, measurement.repeats))
    row["device_error"] = context.device_note
    return stamp_row(row)


def _graph_times(call: Callable, master: Dict[str, torch.Tensor], spec, context: RunContext, repeats: int):
    """(replay times, None) or (None, why not): a call that cannot be captured keeps its other times."""
    try:
        times = measure_graph(
            call, master, context.device, repeats, context.flush, spec.forward_only, context.timer_factory
        )
    except GraphUnavailable as exc:
        return None, str(exc)
    except Exception as exc:  # a host sync inside the call (.item()), an op capture does not support
        failure = f"graph capture: {error_text(exc)}"
    else:
        return times, None
    release_after_failure(context.device)  # outside the except block: its traceback no longer pins tensors
    return None, failure


def run_case(
    case: Case, dtype_name: str, impls: Sequence[str], context: RunContext, emit: Callable[[Dict[str, Any]], None]
) -> List[Dict[str, Any]]:
    """The event pass of one case: a row per impl, each emitted as it is made; returns them."""
    torch.manual_seed(0)
    master, failure, rows = None, None, []
    try:
        master = SPECS[case.op].make_inputs(case, DTYPES[dtype_name], context.device)
    except InputsUnavailable as exc:
        failure = ("skipped", str(exc))
    except torch.cuda.OutOfMemoryError as exc:
        failure = ("oom", f"inputs do not fit: {error_text(exc)}")
    if master is None:
        release_after_failure(context.device)
        for impl in impls:
            rows.append(failure_row(base_row(case, impl, dtype_name, context), *failure))
            emit(rows[-1])
        return rows
    for impl in impls:
        rows.append(run_impl(case, impl, dtype_name, master, context))
        emit(rows[-1])
    return rows


def _rewrite_rows(path: Path, keep_bytes: int, rows: Sequence[Dict[str, Any]]) -> None:
    """Replace this run's rows (all after the file's first ``keep_bytes``) by their final versions."""
    tmp = path.with_name(path.name + ".tmp")
    with open(path, "rb") as fh:
        tmp.write_bytes(fh.read(keep_bytes))
    for row in rows:
        append_row(tmp, row)
    os.replace(tmp, path)  # atomic: a reader sees the old rows or the new ones


def _write_env(run_dir: Path, env: Dict[str, Any]) -> None:
    import json

    path = run_dir / "env.json"
    if not path.exists():  # the runner writes it first; a standalone run writes it here
        path.write_text(json.dumps(env, indent=2, default=str))


def _device_note(trace_factory: Optional[Callable[[], Any]], settings: Settings) -> Optional[str]:
    if trace_factory is None:
        return NO_DEVICE_TIME_REASON
    return DEVICE_PENDING_REASON if settings.device_repeats > 0 else DEVICE_OFF_REASON


def run_suite(
    run_dir: Path,
    *,
    run_id: Optional[str] = None,
    quick: bool = False,
    ops: Sequence[str] = OPS,
    impls: Sequence[str] = ALL_IMPLS,
    dtypes: Sequence[str] = ("bfloat16",),
    device: Optional[str] = None,
    cpu_smoke: bool = False,
    timer_factory: Callable[[torch.device], Any] = PhaseTimer,
    trace_factory: Optional[Callable[[], Any]] = None,
    device_repeats: Optional[int] = None,
    env: Optional[Dict[str, Any]] = None,
    log: Callable[[str], None] = print,
) -> List[Dict[str, Any]]:
    """Measure every case x dtype x impl: the event pass appends each row to run_dir/results.jsonl as it is
    made; the device pass (CUDA, or a given ``trace_factory``) then fills the device fields and rewrites
    this run's rows. ``device_repeats`` overrides the settings' (0: no device pass)."""
    from optkit.measure.env import capture_env

    bad = sorted(set(impls) - set(ALL_IMPLS)) + sorted(set(dtypes) - set(DTYPES))
    if bad:
        raise ValueError(
            f"unknown impl/dtype {', '.join(bad)}; impls: {', '.join(ALL_IMPLS)}; dtypes: {', '.join(DTYPES)}"
        )
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
        run_id=run_id or run_dir.name,
        device=device,
        env=env,
        env_fields=env_stamp(env),
        settings=settings,
        flush=L2Flush(device),
        copy_gbps=None,
        compile_cache=CompileCache(SMOKE_COMPILE_REASON if cpu_smoke else None),
        timer_factory=timer_factory,
        trace_factory=trace_factory,
        device_note=_device_note(trace_factory, settings),
    )
    if device.type != "cuda" and not cpu_smoke:
        for case in cases:
            for dtype_name in dtypes:
                for impl in impls_for(case.op, impls):
                    emit(failure_row(base_row(case, impl, dtype_name, context), "skipped", NO_CUDA_REASON))
        return rows

    started = time.time()
    context.copy_gbps = measure_copy_gbps(device, timer_factory)
    log(
        f"kernels suite: {len(cases)} shapes x {len(dtypes)} dtype(s) x {len(impls)} impls on "
        f"{env.get('gpu_name') or device.type}; copy bandwidth {context.copy_gbps:,.0f} GB/s -> {results_path}"
    )
    case_rows = [
        (case, dtype_name, run_case(case, dtype_name, impls_for(case.op, impls), context, emit))
        for case in cases
        for dtype_name in dtypes
    ]
    event_s = time.time() - started
    if context.device_note != DEVICE_PENDING_REASON:
        log(f"kernels suite: {len(rows)} rows in {event_s:.0f} s; no device pass: {context.device_note}")
        return rows
    log(f"kernels suite: device pass ({settings.device_repeats} profiled repeats per phase)")
    run_device_pass(case_rows, context, log)
    _rewrite_rows(results_path, keep_bytes, rows)
    log(
        f"kernels suite: {len(rows)} rows in {time.time() - started:.0f} s "
        f"(event pass {event_s:.0f} s, device pass {time.time() - started - event_s:.0f} s)"
    )
    return rows


def run(cfg, run_dir: Path, **options) -> List[Dict[str, Any]]:
    """The runner's entry for suite=kernels: bench.device picks the device, bench.run_id the id; ``options``
    are run_suite's (quick, ops, impls, ...)."""
    bench = cfg.bench
    want = bench.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench.device=cuda but CUDA is not available; use bench.device=auto or a GPU machine")
    device = "cpu" if want == "cpu" else ("cuda" if torch.cuda.is_available() else "cpu")
    return run_suite(Path(run_dir), run_id=bench.run_id or Path(run_dir).name, device=device, **options)


# --------------------------------------------------------------------------- command line


def _csv(text: str) -> Tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the kernels suite into DIR (env.json, results.jsonl) and print its table. --config is the runner's
    call (optkit bench suite=kernels: bench.device and bench.run_id come from it); a standalone run needs a
    DIR without results, so that runs are not mixed. A full run takes < 5 min on an H100, --quick < 90 s."""
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--run-dir", required=True, type=Path, help="run directory (env.json, results.jsonl)")
    parser.add_argument("--config", type=Path, help="JSON {config: the resolved config} (the runner's call)")
    parser.add_argument("--quick", action="store_true", help="one shape per op (< 90 s on an H100)")
    parser.add_argument("--ops", type=_csv, default=OPS, help=f"comma list of {','.join(OPS)} (default: all)")
    parser.add_argument(
        "--impls",
        type=_csv,
        default=ALL_IMPLS,
        help=f"comma list of {','.join(ALL_IMPLS)} (default: all; each op gets those that apply)",
    )
    parser.add_argument("--dtypes", type=_csv, default=("bfloat16",), help=f"comma list of {','.join(DTYPES)}")
    parser.add_argument(
        "--device-repeats",
        type=int,
        default=None,
        help="profiled repeats per phase for device time (default 5; 0 skips the device pass)",
    )
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny shapes on the CPU, host clock, Triton interpreter: a plumbing check, no measurement",
    )
    args = parser.parse_args(argv)
    if args.cpu_smoke:  # before optkit's kernels (and so triton) are first imported, when impls resolve
        os.environ.setdefault("TRITON_INTERPRET", "1")
    options = dict(
        quick=args.quick,
        ops=args.ops,
        impls=args.impls,
        dtypes=args.dtypes,
        device_repeats=args.device_repeats,
        cpu_smoke=args.cpu_smoke,
    )
    if args.config is not None:
        from optkit.config.compose import typed_config

        rows = run(typed_config(json.loads(args.config.read_text())["config"]), args.run_dir, **options)
    elif (args.run_dir / "results.jsonl").exists():
        print(f"{args.run_dir / 'results.jsonl'} exists; pass a new --run-dir so runs are not mixed", file=sys.stderr)
        return 2
    else:
        rows = run_suite(args.run_dir, **options)
    print(format_table(rows))
    statuses = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "oom", "error")}
    print(f"\n{len(rows)} rows ({', '.join(f'{n} {s}' for s, n in statuses.items() if n)}) -> {args.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
