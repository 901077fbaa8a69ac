"""Result rows: one self-describing JSON object per measured point, appended to results.jsonl.

Field names carry their unit. A failed point is still a row (status != "ok", with ``error``).
Layout of a run: ``<results_dir>/<gpu-slug>/<suite>/<run_id>/{env.json, results.jsonl}``.

A row never changes meaning silently: when what a field measures changes, SCHEMA_VERSION goes up, and
this is the one place that says what each version changed:
  1  first rows.
  2  the allocator's setup cache (e.g. the bf16 weights a QLoRA model was quantized from) is released
     before warm-up, so NVML figures of the timed window are the training footprint (v1 rows of QLoRA
     points counted ~16 GiB of that cache at Llama-3-8B).
  3  ``enabled_optimizations`` (which listed every switch that was on, applied or skipped) is replaced by
     ``requested_optimizations`` (switched on) and ``applied_optimizations`` (applied to the model).
  4  new fields, none of v3's changes meaning:
     - ``timed_energy_j``, ``energy_j_per_token``, ``avg_power_w``: NVML's energy counter over this row's
       timed steps only (read at the window's edges), where ``energy_mj`` spans the whole process.
     - ``peft``, ``bitsandbytes``, ``liger_kernel``, ``unsloth``, ``accelerate``, ``trl``: versions of the
       libraries that define an opt-set or a peer (the baseline itself is peft's LoRA), None when absent.
     - ``card``, ``card_bytes``, ``card_mode``, ``card_ballast_bytes``, ``card_allocator_cap_bytes``,
       ``card_peak_bytes``, ``card_exceeded``, ``card_note``: the emulated smaller GPU (bench.card); the
       point's ``setting_key`` gains ``card-<name>`` when one is emulated (keys without a card are unchanged).
     - ``fit_search``, ``fit_probe``: a fit suite's probe (which search, its index in the search).
     - opt switches added in v4 (``tiled_mlp``...) leave ``point_key`` unchanged while at their defaults.
     - ``alloc_conf``, ``lora_adapter_dtype``, ``attention_backend``, ``unsloth_patched_layers``,
       ``unsloth_load_s``: the allocator config every point runs under, the LoRA adapters' precision, the
       attention kernels a step ran, and the Unsloth peer's own report (``opt.unsloth``). ``compile_s`` is also
       set for opt.unsloth rows (its first step compiles); their forward_ms / backward_ms / optimizer_ms are
       None (its loss computes the LM head's gradient in forward: whole steps only).
     - ``distributed``, ``world_size``, ``dist_backend``, ``tokens_per_s_per_gpu``, the ``*_per_rank`` lists,
       ``comm_share``, ``comm_exposed_share``: points on several processes (train.distributed, bench.gpus).
       In such a row the throughput fields are global (every rank's tokens), memory fields are the max over
       ranks (each rank in the lists), energy fields the sum over ranks, timing fields rank 0's; mfu / hfu use
       tokens_per_s_per_gpu. ``setting_key`` gains ``<mode>-x<gpus>`` when train.distributed is not none.
     - ``process_start_s``, ``setup_s``: where a point's process spends its time before the first step (its
       interpreter and imports; then model, distribute, optimizer and batches, each synchronized).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List

from optkit.results.jsonl import (  # noqa: F401 - the row file's reading and writing, imported from here too
    BadLine,
    ResultsFileError,
    append_row,
    describe_bad_lines,
    finite,
    json_default,
    read_rows,
    scan_rows,
    write_error,
)

SCHEMA_VERSION = 4

STATUSES = ("ok", "oom", "error", "skipped", "timeout")

# Every row has these keys (values may be None when not applicable, e.g. NVML on a CPU run).
# name -> meaning. Tests check written rows against this list.
ROW_FIELDS: Dict[str, str] = {
    # identity
    "schema_version": "SCHEMA_VERSION of the code that wrote the row",
    "run_id": "id of the sweep (directory name)",
    "suite": "suite name ('none' for a single point)",
    "point_key": "setting_key + '/' + opt name~hash of its switches (what regress matches on)",
    "setting_key": "the point minus its opt-set: model/method/batch/seq/ckpt/optimizer/dtype (speedups compare within it)",
    "config_hash": "sha256[:16] of the fully resolved config (excluding bench.* bookkeeping)",
    "overrides": "the Hydra overrides that define the point",
    "status": "ok | oom | error | skipped | timeout",
    "error": "message (and stderr tail) when status != ok, else None",
    "repeat": "index of the measurement window (bench.repeats)",
    "pid": "process id of the point's process: rows of one process (bench.isolate_repeats=false) share it",
    "windows_in_process": "measurement windows this row's process measured back to back after one warm-up "
                          "(1 with bench.isolate_repeats=true); warm-up, energy, duration, loss curve are the process's",
    # what was run
    "model": "zoo name", "family": "model family", "opt": "opt-set name", "train_method": "full | lora | qlora",
    "batch_size": "rows per step", "seq_len": "tokens per row", "dtype": "model dtype",
    "checkpointing": "train.checkpointing", "optimizer": "train.optimizer", "packing": "data.packing",
    "requested_optimizations": "registry names switched on by the opt config, in application order",
    "applied_optimizations": "registry names the patcher applied to this model (requested minus those skipped: "
                             "e.g. geglu on a SiLU model; patch_log says why)",
    "patch_log": "what the patcher changed, one line per change or skip",
    "config": "the full resolved config",
    # environment (the full capture is env.json beside results.jsonl)
    "device": "cuda | cpu", "gpu_name": "GPU name or None", "gpu_slug": "e.g. h100, cpu",
    "driver": "NVIDIA driver", "torch": "torch version", "triton": "triton version",
    "transformers": "transformers version", "git_sha": "optkit commit", "git_dirty": "uncommitted changes",
    "peft": "peft version (defines the LoRA baseline)",
    "bitsandbytes": "bitsandbytes version (QLoRA, 8-bit optimizers)",
    "liger_kernel": "liger-kernel version (the liger peer)", "unsloth": "unsloth version (None: not installed)",
    "accelerate": "accelerate version", "trl": "trl version",
    "env_fingerprint": "hash of GPU + driver + library versions: compare only equal fingerprints",
    "timestamp": "UTC ISO time the point finished",
    # timing: medians over the timed steps (warm-up excluded)
    "warmup_steps": "steps excluded", "timed_steps": "steps measured",
    "step_ms": "median step time (forward + backward + optimizer)",
    "step_ms_p10": "10th percentile step time", "step_ms_p90": "90th percentile step time",
    "step_ms_iqr": "interquartile range of step time", "step_ms_noisy": "IQR/median > 10%",
    "forward_ms": "median forward time", "backward_ms": "median backward time",
    "optimizer_ms": "median optimizer step (+ zero_grad) time",
    "step_times_ms": "every timed step's time (for CIs and regress)",
    "timer": "cuda_events | host_clock",
    "loss_in_forward": "True when a fused loss computes gradients in forward (backward work in forward_ms)",
    "compile_s": "wall time of the first (compiling) step when torch.compile is on (opt.compile; opt.unsloth, "
                 "which compiles its loss in its first steps), else None",
    "first_step_s": "wall time of the first warm-up step (compilation, autotuning, allocator growth)",
    "warmup_s": "wall time of all warm-up steps",
    # throughput and efficiency
    "tokens_per_step": "real (non-pad) tokens per step", "padded_tokens_per_step": "tokens incl. padding",
    "tokens_per_s": "real tokens / median step time",
    "flops_per_token": "model FLOPs per token (no recompute)", "hw_flops_per_token": "with recompute",
    "flops_formula": "how flops_per_token was counted",
    "peak_tflops": "device dense bf16 peak used for MFU (None: unknown peak)",
    "mfu": "model FLOPs utilization (0..1) or None", "hfu": "hardware FLOPs utilization or None",
    "total_params": "parameters", "trainable_params": "trainable parameters",
    # memory
    "peak_allocated_bytes": "torch.cuda.max_memory_allocated over the timed steps",
    "peak_reserved_bytes": "torch.cuda.max_memory_reserved", "peak_active_bytes": "allocator active peak",
    "num_alloc_retries": "allocator retries (fragmentation pressure)", "num_ooms": "allocator OOMs",
    "peak_nvml_device_bytes": "NVML device-wide used, peak over the whole point",
    "peak_nvml_process_bytes": "NVML this process's used, peak (None when unavailable in the container)",
    "nvml_baseline_bytes": "NVML device used right after CUDA init (the context)",
    "nvml_available": "NVML sampled",
    "nvml_process_bytes_source": "nvml_process | unavailable (containers with host PIDs: read the device figure)",
    "throttled": "a performance-limiting NVML clock-event reason was seen during the point",
    "sm_clock_mhz_min": "lowest SM clock seen while sampling",
    "other_gpu_processes": "other processes on the GPU when the point started", "peak_rss_bytes": "host peak RSS of the point's process",
    "energy_mj": "NVML energy counter delta over the whole point's process (build + warm-up + every window), or None",
    "timed_energy_j": "NVML energy counter delta over this row's timed steps only, read at the window's edges "
                      "(device-wide, J); None without the counter or when it did not advance",
    "energy_j_per_token": "timed_energy_j / (tokens_per_step x timed steps): joules per real token",
    "avg_power_w": "timed_energy_j / the timed window's wall time: mean device power over the timed steps, W",
    "nvml_series": "NVML device-used samples [[t_ms, bytes], ...] over the point, downsampled",
    "nvml_timed_window_ms": "[start, end] of this row's timed steps on nvml_series' clock (ms since sampling began)",
    "nvml_profiled_step_ms": "[start, end] of the profiled step (bench.profile) on nvml_series' clock, or None",
    "peak_nvml_timed_device_bytes": "NVML device-wide used, peak over the timed steps only (not the model build, "
                                    "e.g. QLoRA's bf16 load before quantizing; compare peak_nvml_device_bytes)",
    "nvml_step_series": "NVML device-used samples [[ms since the step began, bytes], ...] of one step at full "
                        "sampling rate, one sample either side",
    "nvml_step_series_of": "which step nvml_step_series shows: profiled_step | last_timed_step",
    "throttle_reasons": "NVML clock-event reasons seen during the point",
    "sm_clock_mhz": "SM clock sampled at the end of the timed steps",
    "device_syncs_per_step": "device->host syncs in one step (bench.count_syncs) or None",
    # profile (bench.profile): one extra step after the timed windows, not in any timing field
    "trace_path": "torch.profiler Chrome/Perfetto trace (.json.gz) of the profiled step, relative to the run dir",
    "profile_time_source": "cuda_kernels: device time of the step's kernels + memcpys + memsets | "
                           "cpu_op_self_time: host op self time (no CUDA; Python outside ops not counted)",
    "profile_step_ms": "sum of that time in the profiled step (the 100% of profile_kernel_share)",
    "profile_kernel_share": "[{category, time_ms, share_pct}] per optkit.measure.profile.CATEGORIES",
    "profile_top_kernels": "[{name (truncated), category, calls, total_ms}] the top 15 by time",
    "profile_step_wall_ms": "host-clock time of the profiled step from its first launch of device work to the end "
                            "of the profiled region, right after the step's final synchronize (None without CUDA: "
                            "see profile_time_source)",
    "profile_device_busy_ms": "union of the profiled step's kernel, memcpy and memset intervals (time any stream "
                              "had work) within profile_step_wall_ms (None without CUDA)",
    "profile_device_idle_share": "1 - profile_device_busy_ms / profile_step_wall_ms: the share of the step the device "
                                 "sat waiting for the host. High means host-bound: Python and kernel launches, not "
                                 "kernels, set the step time, so faster kernels will not shorten it (None without CUDA)",
    "profile_htod_busy_ms": "union of the profiled step's host->device memcpy intervals (e.g. offloaded "
                            "checkpointing's reloads); None when the step has none (or no CUDA)",
    "profile_htod_overlap_fraction": "share of profile_htod_busy_ms during which a compute kernel ran too (copy time "
                                     "hidden behind compute; the rest the step may wait on); None without such copies",
    "profile_dtoh_busy_ms": "union of the profiled step's device->host memcpy intervals (e.g. offloaded "
                            "checkpointing's layer inputs, .item() reads); None when the step has none (or no CUDA)",
    "profile_dtoh_overlap_fraction": "share of profile_dtoh_busy_ms during which a compute kernel ran too; None "
                                     "without such copies",
    "profile_error": "why the profile failed (the timed windows are unaffected), else None",
    # sanity
    "checkpointing_info": "what enable_checkpointing reported (e.g. extra buffer bytes)",
    "loss_last": "loss of the last timed step", "loss_curve": "loss per step (warm-up and earlier windows of the process included)",
    "duration_s": "wall time of the whole point's process incl. model build",
    "process_start_s": "seconds from the point's process start to the point's own start (interpreter, imports)",
    "setup_s": "seconds of each setup part before the first step: model (built, adapted, patched, checkpointed), "
               "distribute, optimizer, batches",
    # card emulation (bench.card / bench.card_gib; optkit/bench/card.py), None without one
    "card": "emulated card (bench.card name or '<n>gib'); memory only: tokens/s are the physical GPU's",
    "card_bytes": "the emulated card's memory (nvidia-smi total)",
    "card_mode": "cap_and_ballast | ballast | cap: how the card was emulated",
    "card_ballast_bytes": "device memory held outside the allocator so the GPU has the card's memory",
    "card_allocator_cap_bytes": "the caching allocator's limit (None under card_mode=ballast)",
    "card_peak_bytes": "the card's peak use: NVML device peak (+ driver reservation) minus the ballast",
    "card_exceeded": "the process used more than card_bytes (NVML): the point does not fit the card",
    "card_note": "where this point's emulation is not a real card (context, allocator cap, managed memory, speed)",
    # several processes (train.distributed, bench.gpus; optkit/bench/ranks.py merges the ranks' rows)
    "distributed": "train.distributed: none | ddp | fsdp2",
    "world_size": "processes the point ran on (bench.gpus: one GPU each; on the CPU gloo processes)",
    "dist_backend": "nccl | gloo (None for a point of one process without torch.distributed)",
    "tokens_per_s_per_gpu": "tokens_per_s / world_size: global real tokens / step time / GPUs (torchtitan's "
                            "convention; equals tokens_per_s on one GPU)",
    "step_ms_per_rank": "each rank's median step time, by rank (step_ms is rank 0's)",
    "peak_allocated_bytes_per_rank": "each rank's peak_allocated_bytes, by rank (peak_allocated_bytes is their max)",
    "peak_reserved_bytes_per_rank": "each rank's peak_reserved_bytes, by rank",
    "peak_nvml_device_bytes_per_rank": "each rank's GPU's NVML device peak over the point, by rank",
    "peak_nvml_timed_device_bytes_per_rank": "each rank's GPU's NVML device peak over the timed steps, by rank",
    "peak_rss_bytes_per_rank": "each rank's host peak RSS, by rank",
    "comm_share": "share of rank 0's profiled step (profile_step_wall_ms) with a communication kernel (NCCL) "
                  "running; None when the profiler cannot tell (no bench.profile, no CUDA, one process)",
    "comm_exposed_share": "share of that step with communication running and no compute kernel beside it "
                          "(the part of comm_share the step waits on)",
    # peers and precision (optkit/opt/peers.py, optkit/opt/unsloth_peer.py, optkit/bench/point_facts.py)
    "alloc_conf": "PYTORCH_ALLOC_CONF the point's process ran under (bench.alloc_conf, set for every point)",
    "lora_adapter_dtype": "dtype of the trainable LoRA adapter weights (opt.adapter_dtype; unsloth: as it made "
                          "them); None without adapters",
    "attention_backend": "attention kernels one extra untimed step after the timed windows ran, from the op names "
                         "torch's profiler saw: sdpa_flash | sdpa_efficient | sdpa_cudnn | sdpa_math | "
                         "sdpa_flash_cpu | flash_attn | xformers | flex, '+'-joined when several, 'unfused' "
                         "when none (eager matmul attention); on the process's last window's row",
    "unsloth_patched_layers": "{qkv, o, mlp}: decoder layers Unsloth says it patched with its fused LoRA (parsed "
                              "from its own message); None outside opt.unsloth or when it printed no count",
    "unsloth_load_s": "wall time of FastLanguageModel.from_pretrained + get_peft_model (checkpoint load, 4-bit "
                      "quantization, its patching at load)",
    # fit search (suite.kind=fit; optkit/bench/fit.py)
    "fit_search": "seq_len | batch_size: the fit search this probe belongs to (None outside a fit suite)",
    "fit_probe": "index of the probe within its search (0 = first)",
}


def env_stamp(env: Dict[str, Any]) -> Dict[str, Any]:
    """The environment fields every row carries, from the capture in env.json (optkit.measure.env)."""
    from optkit.measure.env import env_fingerprint, gpu_slug

    return {
        "gpu_name": env.get("gpu_name"), "gpu_slug": gpu_slug(env), "driver": env.get("driver_version"),
        "torch": env.get("torch_version"), "triton": env.get("triton_version"),
        "transformers": env.get("transformers_version"), "git_sha": env.get("git_sha"),
        "git_dirty": env.get("git_dirty"), "env_fingerprint": env_fingerprint(env),
        **{name: _library_version(env, name) for name in PEER_LIBRARIES},
    }


# Libraries that define an opt-set or a peer; a row names their versions (None: not installed).
PEER_LIBRARIES = ("peft", "bitsandbytes", "liger_kernel", "unsloth", "accelerate", "trl")


def _library_version(env: Dict[str, Any], name: str) -> Any:
    """From env.json when it has the key; an older capture without it is asked of this interpreter."""
    from optkit.measure.env import package_version

    key = f"{name}_version"
    return env[key] if key in env else package_version(name)


def empty_row() -> Dict[str, Any]:
    row = {name: None for name in ROW_FIELDS}
    row["schema_version"] = SCHEMA_VERSION
    return row


def config_hash(config: Dict[str, Any]) -> str:
    """Hash of the resolved config minus bench bookkeeping (run id, resume, paths, progress)."""
    clean = {k: v for k, v in config.items() if k != "bench"}
    bench = dict(config.get("bench", {}))
    for volatile in ("run_id", "resume", "retry", "results_dir", "progress", "timeout_s"):
        bench.pop(volatile, None)
    clean["bench"] = bench
    blob = json.dumps(clean, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def setting_key(config: Dict[str, Any]) -> str:
    """Everything that defines a point except the opt-set: rows with equal setting keys compare
    opt-sets like for like (speedup vs baseline)."""
    m, t, d = config["model"], config["train"], config["data"]
    parts = [m["name"], t["method"], f"b{t['batch_size']}", f"s{d['seq_len']}",
             f"ckpt-{t['checkpointing']}", t["optimizer"], m["dtype"]]
    if m.get("num_layers"):
        parts.append(f"L{m['num_layers']}")
    if d.get("packing"):
        parts.append(f"packed-{d.get('length_dist')}")
    if d.get("source", "synthetic") != "synthetic":
        parts.append(d["source"])
    bench = config.get("bench") or {}
    if t.get("distributed", "none") != "none":
        parts.append(f"{t['distributed']}-x{bench.get('gpus', 1)}")
    if bench.get("card") or bench.get("card_gib"):
        parts.append(f"card-{bench.get('card') or format(bench['card_gib'], 'g') + 'gib'}-{bench.get('card_mode')}")
    return "/".join(str(p) for p in parts)


# Opt switches added after opt-sets had keys, with their defaults: at the default they stay out of the
# digest, so every opt-set that existed before them keeps its point_key (regress matches old runs).
LATER_SWITCH_DEFAULTS = {
    "tiled_mlp": False,
    "tiled_mlp_chunk_tokens": 4096,
    "compile_scope": "model",  # what opt.compile did before the switch existed
    "adapter_dtype": "float32",
    "unsloth": False,
}


def opt_key(config: Dict[str, Any]) -> str:
    """The opt-set's name plus a short hash of its switches: a preset with one switch overridden on
    the command line never shares a key with the unmodified preset."""
    switches = {
        k: v
        for k, v in config["opt"].items()
        if k != "name" and not (k in LATER_SWITCH_DEFAULTS and v == LATER_SWITCH_DEFAULTS[k])
    }
    digest = hashlib.sha256(json.dumps(switches, sort_keys=True).encode()).hexdigest()[:6]
    return f"{config['opt']['name']}~{digest}"


def point_key(config: Dict[str, Any]) -> str:
    """Stable, readable key of a point across runs (regress matches on it)."""
    return f"{setting_key(config)}/{opt_key(config)}"


def identity_fields(config: Dict[str, Any], overrides: List[str], run_id: str, repeat: int) -> Dict[str, Any]:
    """The fields that say which point a row is, from its resolved config (ok and failed rows alike)."""
    m, t, d, o = config["model"], config["train"], config["data"], config["opt"]
    return {
        "run_id": run_id, "suite": config["suite"]["name"], "point_key": point_key(config),
        "setting_key": setting_key(config),
        "config_hash": config_hash(config), "overrides": list(overrides), "repeat": repeat,
        "model": m["name"], "family": m["family"], "opt": o["name"], "train_method": t["method"],
        "batch_size": t["batch_size"], "seq_len": d["seq_len"], "dtype": m["dtype"],
        "checkpointing": t["checkpointing"], "optimizer": t["optimizer"], "packing": d["packing"],
        "warmup_steps": t["warmup_steps"], "timed_steps": t["steps"], "config": config,
        "distributed": t.get("distributed", "none"), "world_size": (config.get("bench") or {}).get("gpus", 1),
    }


def read_run(run_dir: Path) -> tuple[Dict[str, Any], List[Dict[str, Any]]]:
    run_dir = Path(run_dir)
    env_path = run_dir / "env.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    return env, read_rows(run_dir / "results.jsonl")


def iter_ok(rows: Iterable[Dict[str, Any]]):
    return (r for r in rows if r.get("status") == "ok")
