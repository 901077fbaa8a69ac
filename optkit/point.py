"""Run ONE benchmark point in this process and return its result row.

The runner starts ``python -m optkit.point`` in a fresh subprocess per point (fresh CUDA context,
patched modules never leak between points) and reads the row it writes. Every failure becomes a
row: an OOM -> ``oom``, a missing requirement -> ``skipped``, anything else -> ``error``.

Order of work: build model -> training method (LoRA / QLoRA / full) -> optkit.patch -> gradient
checkpointing -> optimizer -> warm-up steps (untimed; compile happens here) -> timed steps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from optkit.results import empty_row, identity_fields

N_DISTINCT_BATCHES = 4  # cycled, so no step re-reads the exact tensors of the previous one


class SkipPoint(RuntimeError):
    """The point cannot run here (missing GPU, library, unsupported model); recorded as `skipped`."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SkipPoint("bench.device=cuda but no CUDA GPU is visible")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def run_point(cfg, overrides: List[str], run_id: str = "adhoc", repeat: int = 0) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    started = time.time()
    config = OmegaConf.to_container(cfg, resolve=True)
    row = empty_row()
    row.update(identity_fields(config, overrides, run_id, repeat))
    sampler = None
    try:
        device = resolve_device(cfg.bench.device)
        row["device"] = device.type
        if cfg.suite.requires_cuda and device.type != "cuda":
            raise SkipPoint(f"suite {cfg.suite.name!r} needs a CUDA GPU; on CPU run suite=smoke")
        sampler = _start_nvml(cfg, device)
        row.update(_train_and_measure(cfg, device))
        row["status"] = "ok"
    except SkipPoint as exc:
        row.update(status="skipped", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure must become a row
        row.update(_failure_fields(exc))
    finally:
        if sampler is not None:
            row.update(_nvml_fields(sampler.stop()))
    row.update(_env_fields())
    row["duration_s"] = round(time.time() - started, 3)
    row["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


def _failure_fields(exc: BaseException) -> Dict[str, Any]:
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
    if _is_oom(exc):
        return {"status": "oom", "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    if type(exc).__name__ == "MissingRequirement":
        return {"status": "skipped", "error": str(exc)}
    return {"status": "error", "error": tail}


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom_type) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------- the measured loop


def _inject_fault(cfg) -> None:
    """Test hook: OPTKIT_INJECT_FAULT="oom@MODEL" | "crash@MODEL" | "hang@MODEL" makes that model's
    point fail the way a real one can (tests of the runner's isolation use it; unset in real runs)."""
    spec = os.environ.get("OPTKIT_INJECT_FAULT", "")
    kind, _, model = spec.partition("@")
    if not kind or model != cfg.model.name:
        return
    if kind == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. (injected by OPTKIT_INJECT_FAULT)")
    if kind == "crash":
        os.abort()
    if kind == "hang":
        time.sleep(3600)


def _train_and_measure(cfg, device: torch.device) -> Dict[str, Any]:
    from optkit import patch as patcher
    from optkit.data import make_batches
    from optkit.measure.memory import allocator_peaks, peak_rss_bytes, reset_allocator_peaks
    from optkit.models import build_model, count_parameters
    from optkit.train.adapters import apply_training_method
    from optkit.train.checkpointing import enable_checkpointing
    from optkit.train.optim import build_optimizer

    _inject_fault(cfg)
    missing = patcher.missing_requirements(cfg.opt, device=device)
    if missing:
        raise SkipPoint("; ".join(missing))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, device, seed=cfg.train.seed)
    vocab_size = model.config.vocab_size
    model = apply_training_method(model, cfg.train)
    if cfg.data.packing:  # padding-free rows need boundary-aware attention (metadata per layer, as HF)
        from optkit.train.packing import install_packed_attention

        install_packed_attention(model)
    model = patcher.patch(model, cfg.opt)
    ckpt_info = enable_checkpointing(model, cfg.train.checkpointing) or {}
    optimizer = build_optimizer(model.parameters(), cfg.train)
    batches = [b.to(device) for b in make_batches(cfg.data, cfg.train.batch_size, vocab_size,
                                                     N_DISTINCT_BATCHES, cfg.train.seed)]
    model.train()

    losses: List[torch.Tensor] = []
    warm = _warmup(model, optimizer, batches, cfg.train.warmup_steps, device, losses)
    reset_allocator_peaks(device)
    step_records = _timed_steps(model, optimizer, batches, cfg.train.warmup_steps, cfg.train.steps, device, losses)
    fields: Dict[str, Any] = {}
    fields.update(warm)
    fields["compile_s"] = warm["first_step_s"] if cfg.opt.compile else None
    fields.update(_timing_fields(step_records, device))
    fields.update(allocator_peaks(device))
    fields["peak_rss_bytes"] = peak_rss_bytes()
    loss_curve = [float(x) for x in torch.stack(losses).float().cpu()] if losses else []
    fields["loss_curve"] = loss_curve
    fields["loss_last"] = loss_curve[-1] if loss_curve else None
    fields["patch_log"] = patcher.patch_log(model)
    fields["enabled_optimizations"] = patcher.enabled_names(cfg.opt)
    fields["loss_in_forward"] = bool(cfg.opt.kernels.fused_linear_cross_entropy or cfg.opt.liger)
    fields.update(count_parameters(model))
    fields.update(_throughput_fields(cfg, model, batches, fields, device))
    fields["checkpointing_info"] = ckpt_info
    if cfg.bench.count_syncs and device.type == "cuda":
        fields["device_syncs_per_step"] = _count_syncs(model, optimizer, batches[0])
    return fields


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warmup(model, optimizer, batches, n_steps: int, device, losses) -> Dict[str, Any]:
    """Untimed warm-up: compilation, autotuning, allocator growth. Its wall time is reported."""
    first_step_s = None
    started = time.perf_counter()
    for i in range(n_steps):
        t0 = time.perf_counter()
        losses.append(_one_step(model, optimizer, batches[i % len(batches)]))
        _sync(device)
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
        "step_ms": step["median"], "step_ms_p10": step["p10"], "step_ms_p90": step["p90"],
        "step_ms_iqr": step["iqr"], "step_ms_noisy": step["noisy"],
        "step_times_ms": [round(r["step_ms"], 4) for r in step_records],
    }
    for phase in ("forward", "backward", "optimizer"):
        fields[f"{phase}_ms"] = summarize([r[f"{phase}_ms"] for r in step_records])["median"]
    return fields


def _throughput_fields(cfg, model, batches, fields, device) -> Dict[str, Any]:
    from optkit.measure.flops import mfu, training_flops
    from optkit.measure.gpu_specs import peak_tflops

    real_tokens = sum(b.real_tokens for b in batches) / len(batches)
    padded_tokens = batches[0].padded_tokens
    tokens_per_s = real_tokens / (fields["step_ms"] / 1e3) if fields["step_ms"] else None
    hf_config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    lora_params = fields["trainable_params"] if cfg.train.method in ("lora", "qlora") else 0
    flops = training_flops(hf_config, cfg.data.seq_len, cfg.train.method,
                           cfg.train.checkpointing != "none", lora_params=lora_params)
    peak = cfg.bench.peak_tflops
    if peak is None and device.type == "cuda":
        peak = peak_tflops(torch.cuda.get_device_name(device), cfg.model.dtype)
    return {
        "tokens_per_step": real_tokens, "padded_tokens_per_step": padded_tokens, "tokens_per_s": tokens_per_s,
        "flops_per_token": flops["model_flops_per_token"], "hw_flops_per_token": flops["hardware_flops_per_token"],
        "flops_formula": flops["formula"], "peak_tflops": peak,
        "mfu": mfu(tokens_per_s, flops["model_flops_per_token"], peak) if tokens_per_s else None,
        "hfu": mfu(tokens_per_s, flops["hardware_flops_per_token"], peak) if tokens_per_s else None,
    }


def _count_syncs(model, optimizer, batch) -> Optional[int]:
    from optkit.measure.syncs import count_device_syncs

    return count_device_syncs(lambda: _one_step(model, optimizer, batch))


# --------------------------------------------------------------------------- environment / NVML


def _start_nvml(cfg, device: torch.device):
    if device.type != "cuda":
        return None
    from optkit.measure.nvml import NvmlSampler

    torch.empty(1, device=device)  # create the CUDA context first: the sampler's baseline includes it
    index = device.index if device.index is not None else torch.cuda.current_device()
    sampler = NvmlSampler(device_index=index, interval_ms=cfg.bench.nvml_interval_ms)
    sampler.start()
    return sampler


def _nvml_fields(report) -> Dict[str, Any]:
    r = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    series = list(zip(r.get("series_t_ms") or [], r.get("series_used_bytes") or []))
    return {
        "nvml_available": r.get("available"),
        "peak_nvml_device_bytes": r.get("peak_device_used_bytes"),
        "peak_nvml_process_bytes": r.get("peak_process_used_bytes"),
        "nvml_baseline_bytes": r.get("baseline_device_used_bytes"),
        "nvml_process_bytes_source": r.get("process_bytes_source"),
        "throttle_reasons": r.get("throttle_reasons_seen"),
        "throttled": r.get("throttled"),
        "sm_clock_mhz": r.get("sm_clock_mhz_stop"),
        "sm_clock_mhz_min": r.get("sm_clock_mhz_min"),
        "energy_mj": r.get("energy_mj"),
        "other_gpu_processes": r.get("other_processes_at_start"),
        "nvml_series": [[round(t, 1), b] for t, b in series] or None,
    }


def _env_fields() -> Dict[str, Any]:
    from optkit.measure.env import capture_env, env_fingerprint, gpu_slug

    env = capture_env()
    return {
        "gpu_name": env.get("gpu_name"), "gpu_slug": gpu_slug(env), "driver": env.get("driver_version"),
        "torch": env.get("torch_version"), "triton": env.get("triton_version"),
        "transformers": env.get("transformers_version"), "git_sha": env.get("git_sha"), "git_dirty": env.get("git_dirty"), "env_fingerprint": env_fingerprint(env),
    }


# --------------------------------------------------------------------------- subprocess entry


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optkit.point", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="file the row is written to (JSON)")
    parser.add_argument("--run-id", default="adhoc")
    parser.add_argument("--repeat", type=int, default=0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from optkit.compose import compose

    cfg = compose(args.overrides)
    row = run_point(cfg, args.overrides, run_id=args.run_id, repeat=args.repeat)
    from optkit.results import _finite, _json_default

    Path(args.out).write_text(json.dumps(_finite(row), default=_json_default))
    return 0


if __name__ == "__main__":
    sys.exit(main())
