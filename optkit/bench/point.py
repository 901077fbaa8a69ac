"""Run ONE benchmark point in this process and return its result row.

The runner starts ``python -m optkit.bench.point`` in a fresh subprocess per point (fresh CUDA context,
patched modules never leak between points) and reads the rows it writes: one per measurement
window (``--repeats 0,1,2`` measures three windows back to back after one warm-up; the runner
passes one index per process with ``bench.isolate_repeats=true``). Every failure becomes a row: an
OOM -> ``oom``, a missing requirement -> ``skipped``, anything else -> ``error``; windows measured
before a failure keep their ok rows.

Order of work: build model -> training method (LoRA / QLoRA / full) -> optkit.patch -> gradient
checkpointing -> optimizer -> warm-up steps (untimed; compile happens here) -> timed windows ->
(bench.count_syncs) one untimed step counting syncs -> (bench.profile) one untimed step under
torch.profiler, after every timed step because a profiler session slows every later launch in the process ->
one untimed step naming the attention kernels it runs (bench/point_facts.py: op names, no timing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from optkit.bench.card import card_identity, start_card
from optkit.bench.point_facts import attention_backend, process_facts
from optkit.bench.point_fields import env_fields, nvml_fields, start_nvml, window_nvml_fields
from optkit.bench.ranks import finish_ranks, rank_suffix
from optkit.bench.setup import SkipPoint, build_training
from optkit.config.compose import typed_config
from optkit.config.schema import OptkitConfig
from optkit.measure.device_timing import synchronize
from optkit.opt import patcher
from optkit.opt.registry import enabled_names
from optkit.results.rows import empty_row, finite, identity_fields, json_default
from optkit.train.distributed import close_world, current_world, init_world, unwrap
from optkit.train.method import ADAPTER_METHODS


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SkipPoint("bench.device=cuda but no CUDA GPU is visible")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def run_point(
    cfg: OptkitConfig,
    overrides: List[str],
    run_id: str = "adhoc",
    repeats: Sequence[int] = (0,),
    run_dir: Optional[Path] = None,
) -> List[Dict[str, Any]]:
    """Measure one point: one row per index in ``repeats`` (a measurement window each).

    ``run_dir`` is where bench.profile writes its trace (``traces/`` below it); rows name it relative."""
    started = time.time()
    before_point_s = _process_start_s()
    config = dataclasses.asdict(cfg)
    base = empty_row()
    base.update(identity_fields(config, overrides, run_id, repeats[0]))
    base.update(pid=os.getpid(), windows_in_process=len(repeats))
    windows: List[Dict[str, Any]] = []  # fields of each finished window
    failure: Dict[str, Any] = {"status": "error", "error": "window not measured"}
    sampler = None
    nvml_report = None
    card = None  # bench.card's emulation, held (with its ballast) until the process ends
    try:
        base.update(card_identity(cfg.bench))
        device = resolve_device(cfg.bench.device)
        base["device"] = device.type
        if cfg.suite.requires_cuda and device.type != "cuda":
            raise SkipPoint(f"suite {cfg.suite.name!r} needs a CUDA GPU; on CPU run suite=smoke")
        sampler = start_nvml(cfg, device)
        card = start_card(cfg.bench, cfg.train.optimizer, device)  # before the model: the card's memory only
        trace = _trace_file(run_dir, base, repeats[-1]) if cfg.bench.profile else None
        _train_and_measure(cfg, device, len(repeats), windows, sampler, trace)
    except SkipPoint as exc:
        failure = {"status": "skipped", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - every failure must become a row
        failure = _failure_fields(exc)
    finally:
        if sampler is not None:
            nvml_report = sampler.stop()
    shared = nvml_fields(nvml_report) if nvml_report is not None else {}
    if card is not None:
        shared.update(card.fields(nvml_report))
    shared.update(env_fields())
    shared["duration_s"] = round(time.time() - started, 3)
    shared["process_start_s"] = before_point_s
    shared["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for i, repeat in enumerate(repeats):
        row = dict(base, repeat=repeat, **shared)
        if i < len(windows):
            row.update(windows[i], status="ok")
            row.update(window_nvml_fields(sampler, windows[i]))
        else:
            row.update(failure)
        rows.append(row)
    return rows


def _trace_file(run_dir: Optional[Path], row: Dict[str, Any], repeat: int) -> Tuple[Path, str]:
    """(absolute path, path relative to the run dir) of the point's trace."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{row['model']}-{row['opt']}-{row['config_hash'][:8]}{rank_suffix()}")
    relative = f"traces/{stem}-r{repeat}.json.gz"
    return Path(run_dir or ".") / relative, relative


def _failure_fields(exc: BaseException) -> Dict[str, Any]:
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
    if _is_oom(exc):
        return {"status": "oom", "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    if type(exc).__name__ == "MissingRequirement":
        return {"status": "skipped", "error": str(exc)}
    # The cause first: the summary and the sweep's progress show an error's first line.
    cause = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return {"status": "error", "error": f"{cause}\n{tail}"}


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom_type) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------- the measured loop


def _inject_fault(cfg) -> None:
    """Test hook: OPTKIT_INJECT_FAULT="oom@MODEL" | "crash@MODEL" | "hang@MODEL" makes that model's
    point fail the way a real one can (tests of the runner's isolation use it; unset in real runs);
    OPTKIT_INJECT_FAULT_RANK=R limits it to rank R of a point of several processes."""
    spec = os.environ.get("OPTKIT_INJECT_FAULT", "")
    kind, _, model = spec.partition("@")
    if not kind or model != cfg.model.name:
        return
    if os.environ.get("OPTKIT_INJECT_FAULT_RANK", str(current_world().rank)) != str(current_world().rank):
        return
    if kind == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. (injected by OPTKIT_INJECT_FAULT)")
    if kind == "crash":
        os.abort()
    if kind == "hang":
        time.sleep(3600)


def _train_and_measure(
    cfg, device: torch.device, n_windows: int, windows: List[Dict[str, Any]], sampler, trace: Optional[Tuple[Path, str]]
) -> None:
    """Build, warm up once, then measure ``n_windows`` windows; each window's fields are appended to
    ``windows`` as soon as it is done (a later failure keeps them)."""
    from optkit.measure.memory import allocator_peaks, peak_rss_bytes, reset_allocator_peaks
    from optkit.models import count_parameters

    _inject_fault(cfg)
    setup_times: Dict[str, float] = {}
    model, optimizer, batches, ckpt_info = build_training(cfg, device, setup_times)
    _release_setup_cache(device)

    losses: List[torch.Tensor] = []
    warm = _warmup(model, optimizer, batches, cfg.train.warmup_steps, device, losses)
    shared: Dict[str, Any] = dict(warm)
    shared["setup_s"] = setup_times
    shared["compile_s"] = warm["first_step_s"] if cfg.opt.compile else None
    shared["patch_log"] = patcher.patch_log(unwrap(model))
    shared["requested_optimizations"] = enabled_names(cfg.opt)
    shared["applied_optimizations"] = patcher.applied_names(unwrap(model))
    shared["loss_in_forward"] = bool(cfg.opt.kernels.fused_linear_cross_entropy or cfg.opt.liger)
    shared.update(count_parameters(model))
    shared.update(process_facts(model))  # allocator config, LoRA adapters' dtype
    shared["checkpointing_info"] = ckpt_info
    steps_done = cfg.train.warmup_steps
    for _ in range(n_windows):
        reset_allocator_peaks(device)
        window_start_ms = _now_ms(sampler)
        step_records = _timed_steps(model, optimizer, batches, steps_done, cfg.train.steps, device, losses)
        window_end_ms = _now_ms(sampler)  # after the timer's synchronize: the window's device work is done
        steps_done += cfg.train.steps
        fields = dict(shared)
        fields.update(_timing_fields(step_records, device))
        fields.update(allocator_peaks(device))
        fields["peak_rss_bytes"] = peak_rss_bytes()
        fields["nvml_timed_window_ms"] = None if window_start_ms is None else [window_start_ms, window_end_ms]
        loss_curve = [float(x) for x in torch.stack(losses).float().cpu()] if losses else []
        fields["loss_curve"] = loss_curve
        fields["loss_last"] = loss_curve[-1] if loss_curve else None
        fields.update(_throughput_fields(cfg, model, batches, fields, device))
        if len(windows) == n_windows - 1:  # the extra untimed steps follow the last window only
            fields.update(
                _untimed_extras(cfg, model, optimizer, batches[steps_done % len(batches)], device, sampler, trace)
            )
        windows.append(fields)
    for fields in windows:  # counted once per process, true of every window
        fields["device_syncs_per_step"] = windows[-1].get("device_syncs_per_step")


def _release_setup_cache(device: torch.device) -> None:
    """Hand the allocator's cached blocks from model setup back to the driver before training starts.

    Building a model in bf16 and then quantizing it (QLoRA) leaves the bf16 weights' blocks cached:
    NVML would count ~16 GiB at Llama-3-8B that a user loading a 4-bit checkpoint never holds. The
    warm-up steps then grow the cache to what training needs, so the timed window's NVML peak is the
    training footprint."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def _untimed_extras(cfg, model, optimizer, batch, device, sampler, trace) -> Dict[str, Any]:
    fields: Dict[str, Any] = {}
    if cfg.bench.count_syncs and device.type == "cuda":
        fields["device_syncs_per_step"] = _count_syncs(model, optimizer, batch)
    if trace is not None:
        fields.update(_profiled_step(model, optimizer, batch, device, sampler, trace))
    # which attention kernels ran: op names only, so it may follow the profiled step (whose timing it would skew)
    fields.update(attention_backend(lambda: _one_step(model, optimizer, batch)))
    return fields


def _profiled_step(model, optimizer, batch, device, sampler, trace: Tuple[Path, str]) -> Dict[str, Any]:
    """One step under torch.profiler; a profiler failure is recorded, never fails the measured point."""
    from optkit.measure.profile import profile_step

    marks: List[Optional[float]] = []

    def step():
        marks.append(_now_ms(sampler))
        _one_step(model, optimizer, batch)
        synchronize(device)
        marks.append(_now_ms(sampler))

    path, relative = trace
    try:
        fields = profile_step(step, device, path)
    except Exception as exc:  # noqa: BLE001 - the timed windows are already measured (an OOM too)
        return {"profile_error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    fields["trace_path"] = relative
    fields["nvml_profiled_step_ms"] = marks if marks and marks[0] is not None else None
    return fields


def _now_ms(sampler) -> Optional[float]:
    return sampler.now_ms() if sampler is not None else None


def _one_step(model, optimizer, batch, timer=None) -> torch.Tensor:
    # use_cache=False: training needs no KV cache, and HF only detects packed rows without one.
    out = model(**batch.tensors, use_cache=False)
    loss = out.loss
    if timer:
        timer.mark("forward")
    loss.backward()
    if timer:
        timer.mark("backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if timer:
        timer.mark("optimizer")
    return loss.detach()


def _warmup(model, optimizer, batches, n_steps: int, device, losses) -> Dict[str, Any]:
    """Untimed warm-up: compilation, autotuning, allocator growth. Its wall time is reported."""
    first_step_s = None
    started = time.perf_counter()
    for i in range(n_steps):
        t0 = time.perf_counter()
        losses.append(_one_step(model, optimizer, batches[i % len(batches)]))
        synchronize(device)
        if i == 0:
            first_step_s = time.perf_counter() - t0
    return {"warmup_s": round(time.perf_counter() - started, 3), "first_step_s": first_step_s}


def _timed_steps(model, optimizer, batches, offset: int, n_steps: int, device, losses):
    from optkit.measure.timing import PhaseTimer

    timer = PhaseTimer(device)
    for i in range(n_steps):
        timer.begin_step()
        losses.append(_one_step(model, optimizer, batches[(offset + i) % len(batches)], timer))
        timer.end_step()
    return timer.results()


def _timing_fields(step_records: List[Dict[str, float]], device) -> Dict[str, Any]:
    from optkit.measure.stats import summarize

    step = summarize([r["step_ms"] for r in step_records])
    fields = {
        "timer": "cuda_events" if device.type == "cuda" else "host_clock",
        "step_ms": step["median"],
        "step_ms_p10": step["p10"],
        "step_ms_p90": step["p90"],
        "step_ms_iqr": step["iqr"],
        "step_ms_noisy": step["noisy"],
        "step_times_ms": [round(r["step_ms"], 4) for r in step_records],
    }
    for phase in ("forward", "backward", "optimizer"):
        fields[f"{phase}_ms"] = summarize([r[f"{phase}_ms"] for r in step_records])["median"]
    return fields


def _throughput_fields(cfg, model, batches, fields, device) -> Dict[str, Any]:
    from optkit.measure.flops import mfu, training_flops
    from optkit.measure.gpu_specs import peak_tflops
    from optkit.opt.recompute_skip import skipped_params_per_token

    real_tokens = sum(b.real_tokens for b in batches) / len(batches)
    padded_tokens = batches[0].padded_tokens
    tokens_per_s = real_tokens / (fields["step_ms"] / 1e3) if fields["step_ms"] else None
    hf_config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    lora_params = fields["trainable_params"] if cfg.train.method in ADAPTER_METHODS else 0
    flops = training_flops(
        hf_config,
        cfg.data.seq_len,
        cfg.train.method,
        cfg.train.checkpointing != "none",
        lora_params=lora_params,
        recompute_skipped_params=skipped_params_per_token(model),
    )
    peak = cfg.bench.peak_tflops
    if peak is None and device.type == "cuda":
        peak = peak_tflops(torch.cuda.get_device_name(device), cfg.model.dtype)
    return {
        "tokens_per_step": real_tokens,
        "padded_tokens_per_step": padded_tokens,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops["model_flops_per_token"],
        "hw_flops_per_token": flops["hardware_flops_per_token"],
        "flops_formula": flops["formula"],
        "peak_tflops": peak,
        "mfu": mfu(tokens_per_s, flops["model_flops_per_token"], peak) if tokens_per_s else None,
        "hfu": mfu(tokens_per_s, flops["hardware_flops_per_token"], peak) if tokens_per_s else None,
    }


def _process_start_s() -> Optional[float]:
    """Seconds from this process's start to now (at a point's start: its interpreter and imports), from /proc:
    Linux only, None elsewhere."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError):
        return None


def _count_syncs(model, optimizer, batch) -> Optional[int]:
    from optkit.measure.syncs import count_device_syncs

    return count_device_syncs(lambda: _one_step(model, optimizer, batch))


# --------------------------------------------------------------------------- subprocess entry


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optkit.bench.point", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="file the rows are written to (a JSON list)")
    parser.add_argument("--run-id", default="adhoc")
    parser.add_argument(
        "--repeats",
        default="0",
        help="comma-separated repeat indexes: one measurement window each, back to back after one warm-up (default: 0)",
    )
    parser.add_argument(
        "--run-dir",
        default=None,
        help="run directory (bench.profile writes traces/ below it; default: the --out file's folder)",
    )
    parser.add_argument(
        "--config",
        required=True,
        help="JSON {config: the resolved config, overrides: the Hydra "
        "overrides that define the point} (the runner composes and writes it)",
    )
    args = parser.parse_args(argv)
    point = json.loads(Path(args.config).read_text())
    cfg = typed_config(point["config"])
    repeats = [int(r) for r in args.repeats.split(",") if r.strip()]
    run_dir = Path(args.run_dir) if args.run_dir else Path(args.out).resolve().parent
    world = init_world(cfg.bench.device)  # a torchrun launch (train.distributed): join its process group
    rows = run_point(cfg, point["overrides"], run_id=args.run_id, repeats=repeats, run_dir=run_dir)
    rows = finish_ranks(rows, world, Path(args.out), run_dir)  # rank 0 writes the ranks' merged rows
    if rows is not None:
        Path(args.out).write_text(json.dumps(finite(rows), default=json_default))
    close_world()
    return 0


if __name__ == "__main__":
    sys.exit(main())
