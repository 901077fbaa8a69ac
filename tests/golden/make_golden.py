"""Write the synthetic result runs that test report and regress: `python tests/golden/make_golden.py`.

Every number is made up but shaped like a real run (H100 / "H200", Llama-3-8B LoRA, bf16), and
derived from a seeded RNG, so running this again rewrites byte-identical files
(tests/test_report.py checks that). The rows go through optkit.results.append_row, the writer the
runner uses, so they have the real file format and every ROW_FIELDS key.

Runs written (``<slug>/<suite>/<run_id>``):
  cpu/smoke/golden-smoke              tiny models, host clock, no NVML, one error row
  h100/ablation/golden-ablation       every optimization alone on/off, 2 repeats, one skipped, one oom,
                                      NVML series and a trace path on some rows
  h100/scaling/golden-scaling         seq 512..16384, the baseline OOMs at 16384
  h100/kernels/golden-kernels         kernel rows (kind="kernel"), one skipped peer
  h100/convergence/golden-convergence 300-step loss curves, baseline vs full
  h100/e2e/golden-e2e-h100, h200/e2e/golden-e2e-h200   the same suite on two GPUs
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from optkit.results.rows import SCHEMA_VERSION, append_row, config_hash, empty_row, point_key, setting_key  # noqa: E402

GOLDEN_DIR = Path(__file__).resolve().parent
GIB = 1024**3
H100 = {
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "gpu_slug": "h100",
    "driver": "580.65.06",
    "cuda": "13.0",
    "peak_tflops": 989.4,
}
H200 = {"gpu_name": "NVIDIA H200", "gpu_slug": "h200", "driver": "580.65.06", "cuda": "13.0", "peak_tflops": 989.4}
CPU = {"gpu_name": None, "gpu_slug": "cpu", "driver": None, "cuda": None, "peak_tflops": None}
VERSIONS = {
    "torch": "2.11.0+cu130",
    "triton": "3.6.0",
    "transformers": "5.17.0",
    "git_sha": "0123abc4567def",
    "git_dirty": False,
}
TIMESTAMP = "2025-01-01T00:00:00+00:00"  # fixed: the files must be reproducible


def _digest(*key) -> int:
    """Stable across processes (str.__hash__ is salted): 64 bits of sha256 of the key."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, key)).encode()).digest()[:8], "little")


def _rng(*key) -> np.random.Generator:
    """A generator seeded by the row's identity, so rows do not depend on their order."""
    return np.random.default_rng(_digest(*key))


def step_times(median_ms: float, n: int, rel_sd: float, *key, digits: int = 3) -> list:
    """n step times around median_ms: normal noise plus one slow outlier, as real steps look."""
    t = median_ms * (1.0 + rel_sd * _rng(*key).standard_normal(n))
    t[n // 2] = median_ms * (1.0 + 6 * rel_sd)
    return [round(float(v), digits) for v in t]


def env_for(gpu: dict) -> dict:
    """Keys as optkit.measure.env.capture_env writes them (env.json has no slug: the path has it)."""
    return {
        "timestamp_utc": TIMESTAMP,
        "hostname": "golden",
        "python_version": "3.12.3",
        "cuda_version": gpu["cuda"],
        "gpu_name": gpu["gpu_name"],
        "driver_version": gpu["driver"],
        "gpu_count": 0 if gpu["gpu_slug"] == "cpu" else 1,
        "torch_version": VERSIONS["torch"],
        "triton_version": VERSIONS["triton"],
        "transformers_version": VERSIONS["transformers"],
        "git_sha": VERSIONS["git_sha"],
        "git_dirty": VERSIONS["git_dirty"],
    }


def fingerprint(gpu: dict) -> str:
    return f"{_digest(gpu['gpu_name'], gpu['driver'], VERSIONS['torch'], VERSIONS['triton']):016x}"[:12]


def train_row(
    gpu: dict,
    suite: str,
    run_id: str,
    model: str,
    opt: str,
    *,
    batch: int = 2,
    seq: int = 2048,
    step_ms: float = 900.0,
    fwd_share: float = 0.32,
    opt_ms: float = 12.0,
    peak_alloc_gib: float = 30.0,
    status: str = "ok",
    error: str | None = None,
    repeat: int = 0,
    n_steps: int = 20,
    rel_sd: float = 0.015,
    flops_per_token: float = 3.3e10,
    loss_curve: list | None = None,
    method: str = "lora",
) -> dict:
    row = empty_row()
    config = {
        "model": {"name": model, "dtype": "bfloat16", "num_layers": None},
        "train": {"method": method, "batch_size": batch, "checkpointing": "standard", "optimizer": "adamw"},
        "data": {"seq_len": seq, "packing": False, "source": "synthetic"},
        "opt": {"name": opt, "preset": opt},
        "suite": {"name": suite, "baseline_opt": "baseline"},
    }
    key = point_key(config)
    row.update(
        run_id=run_id,
        suite=suite,
        point_key=key,
        setting_key=setting_key(config),
        config_hash=config_hash(config),
        overrides=[f"model={model}", f"opt={opt}", f"train.batch_size={batch}", f"data.seq_len={seq}"],
        status=status,
        error=error,
        repeat=repeat,
        model=model,
        family="llama",
        opt=opt,
        train_method=method,
        batch_size=batch,
        seq_len=seq,
        dtype="bfloat16",
        checkpointing="standard",
        optimizer="adamw",
        packing=False,
        config=config,
        device="cpu" if gpu["gpu_slug"] == "cpu" else "cuda",
        gpu_name=gpu["gpu_name"],
        gpu_slug=gpu["gpu_slug"],
        driver=gpu["driver"],
        timestamp=TIMESTAMP,
        env_fingerprint=fingerprint(gpu),
        **VERSIONS,
    )
    row["loss_curve"] = loss_curve
    if status != "ok":
        return row
    times = step_times(step_ms, n_steps, rel_sd, run_id, key, repeat)
    median = float(np.median(times))
    tokens = batch * seq
    tokens_per_s = tokens / (median / 1e3)
    peak = gpu["peak_tflops"]
    on_gpu = peak is not None
    row.update(
        warmup_steps=3,
        timed_steps=n_steps,
        step_ms=round(median, 3),
        step_ms_p10=round(float(np.percentile(times, 10)), 3),
        step_ms_p90=round(float(np.percentile(times, 90)), 3),
        step_ms_iqr=round(float(np.subtract(*np.percentile(times, [75, 25]))), 3),
        step_ms_noisy=False,
        forward_ms=round(median * fwd_share, 3),
        backward_ms=round(median * (1 - fwd_share) - opt_ms, 3),
        optimizer_ms=opt_ms,
        step_times_ms=times,
        timer="cuda_events" if on_gpu else "host_clock",
        loss_in_forward=fused_loss(opt),
        tokens_per_step=tokens,
        padded_tokens_per_step=tokens,
        tokens_per_s=round(tokens_per_s, 2),
        flops_per_token=flops_per_token,
        hw_flops_per_token=flops_per_token * 1.33,
        flops_formula="4N_frozen+6N_lora+12LHQT causal/2",
        peak_tflops=peak,
        mfu=round(tokens_per_s * flops_per_token / (peak * 1e12), 4) if on_gpu else None,
        total_params=8_030_000_000,
        trainable_params=41_943_040,
        loss_last=2.31,
        duration_s=round(median * (n_steps + 3) / 1e3 + 40, 1),
    )
    if on_gpu:
        nvml = peak_alloc_gib * 1.08 + 0.5
        row.update(
            peak_allocated_bytes=int(peak_alloc_gib * GIB),
            peak_reserved_bytes=int(peak_alloc_gib * 1.04 * GIB),
            peak_active_bytes=int(peak_alloc_gib * GIB),
            num_alloc_retries=0,
            num_ooms=0,
            peak_nvml_device_bytes=int(nvml * GIB),
            peak_nvml_process_bytes=int((nvml - 0.05) * GIB),
            nvml_baseline_bytes=int(0.5 * GIB),
            nvml_available=True,
            energy_j_per_token=0.11,
            throttle_reasons=[],
            sm_clock_mhz=1980,
        )
    return row


def fused_loss(opt: str) -> bool:
    """Opt-sets whose fused linear cross-entropy computes gradients in forward."""
    if opt.startswith("full_minus_"):
        return "cross_entropy" not in opt
    return opt in ("full", "full_compile", "liger") or "cross_entropy" in opt


def loss_curve(n: int, offset: float, opt: str, *key) -> list:
    """Same batches for every opt-set (shared noise); numerics differ a little per opt-set."""
    steps = np.arange(n)
    batches = 0.03 * _rng(*key).standard_normal(n)
    numerics = 0.002 * _rng(opt, *key).standard_normal(n)
    return [round(float(v), 4) for v in 2.0 + 8.5 * np.exp(-steps / 40.0) + batches + numerics + offset]


def nvml_series(peak_gib: float, step_ms: float) -> list:
    """[t_ms, bytes] every 50 ms: context, model load, then a saw-tooth per training step."""
    t = np.arange(0, step_ms * 6, 50.0)
    load = np.clip(t / (step_ms * 1.5), 0, 1) * 0.7
    saw = np.where(t > step_ms * 1.5, 0.3 * ((t % step_ms) / step_ms), 0.0)
    used = 0.5 + (peak_gib - 0.5) * (load + saw)
    return [[round(float(a), 1), int(b * GIB)] for a, b in zip(t, used)]


def kernel_row(
    gpu: dict,
    run_id: str,
    op: str,
    impl: str,
    tokens: int,
    hidden: int,
    full_ms: float,
    bytes_per_elem_pass: int,
    status: str = "ok",
    error: str | None = None,
) -> dict:
    shape = f"{tokens}x{hidden}"
    row = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "suite": "kernels",
        "kind": "kernel",
        "status": status,
        "error": error,
        "op": op,
        "impl": impl,
        "dtype": "bfloat16",
        "shape": shape,
        "tokens": tokens,
        "hidden": hidden,
        "gpu_name": gpu["gpu_name"],
        "gpu_slug": gpu["gpu_slug"],
        "point_key": f"{op}/{impl}/bfloat16/{shape}",
        "timestamp": TIMESTAMP,
        "model": "llama3_8b",
        "loss_in_forward": op == "cross_entropy" and impl in ("optkit", "liger"),
        "throttled": False,
        "full_ms_noisy": False,
        **VERSIONS,
    }
    for name in (
        "fwd_ms",
        "bwd_ms",
        "full_ms",
        "full_ms_p10",
        "full_ms_p90",
        "full_times_ms",
        "bytes_full",
        "gbps_full",
        "copy_gbps",
        "frac_of_copy",
        "peak_bytes",
        "peak_delta_bytes",
    ):
        row[name] = None
    if status != "ok":
        return row
    times = step_times(full_ms, 50, 0.01, run_id, op, impl, shape, digits=5)
    median = float(np.median(times))
    nbytes = tokens * hidden * 2 * bytes_per_elem_pass
    copy_gbps = 2950.0
    gbps = nbytes / (median / 1e3) / 1e9
    row.update(
        fwd_ms=round(median * 0.4, 4),
        bwd_ms=round(median * 0.6, 4),
        full_ms=round(median, 4),
        full_ms_p10=round(float(np.percentile(times, 10)), 4),
        full_ms_p90=round(float(np.percentile(times, 90)), 4),
        full_times_ms=times,
        bytes_full=nbytes,
        gbps_full=round(gbps, 1),
        copy_gbps=copy_gbps,
        frac_of_copy=round(gbps / copy_gbps, 4),
        peak_bytes=int(nbytes * 1.5),
        peak_delta_bytes=int(nbytes * 0.6),
    )
    return row


def write_run(root: Path, gpu: dict, suite: str, run_id: str, rows: list) -> Path:
    run_dir = Path(root) / gpu["gpu_slug"] / suite / run_id
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "env.json").write_text(json.dumps(env_for(gpu), indent=2, sort_keys=True) + "\n")
    for row in rows:
        append_row(run_dir / "results.jsonl", row)
    return run_dir


def smoke_run(root: Path) -> Path:
    run_id, rows = "golden-smoke", []
    for i, model in enumerate(["tiny_llama", "tiny_qwen3", "tiny_gemma2", "tiny_qwen3_moe"]):
        for opt, scale in (("baseline", 1.0), ("kernels", 1.35)):
            if model == "tiny_qwen3_moe" and opt == "kernels":
                rows.append(
                    train_row(
                        CPU,
                        "smoke",
                        run_id,
                        model,
                        opt,
                        batch=2,
                        seq=64,
                        status="error",
                        error="RuntimeError: moe router kernel: shape mismatch (64, 8) vs (64, 4)",
                    )
                )
                continue
            rows.append(
                train_row(
                    CPU,
                    "smoke",
                    run_id,
                    model,
                    opt,
                    batch=2,
                    seq=64,
                    step_ms=(40.0 + 9 * i) * scale,
                    n_steps=3,
                    rel_sd=0.05,
                    flops_per_token=2e6,
                    loss_curve=loss_curve(4, 0.0, opt, model, "smoke"),
                )
            )
    return write_run(root, CPU, "smoke", run_id, rows)


ABLATION = [  # opt-set (runner's names: only_<opt>, full_minus_<opt>), step time vs baseline, peak allocated GiB
    ("baseline", 1.00, 30.0),
    ("full", 0.78, 21.5),
    ("only_rms_norm", 0.97, 29.4),
    ("only_rope", 0.985, 29.8),
    ("only_swiglu", 0.95, 27.9),
    ("only_fused_linear_cross_entropy", 0.93, 24.6),
    ("only_fused_lora", 0.90, 28.3),
    ("full_minus_fused_linear_cross_entropy", 0.84, 27.0),
    ("full_minus_fused_lora", 0.86, 22.1),
]


def ablation_run(root: Path) -> Path:
    run_id, rows = "golden-ablation", []
    for opt, factor, alloc in ABLATION:
        for repeat in range(2):
            row = train_row(
                H100,
                "ablation",
                run_id,
                "llama3_8b",
                opt,
                step_ms=900.0 * factor * (1 + 0.004 * repeat),
                peak_alloc_gib=alloc,
                repeat=repeat,
            )
            if opt in ("baseline", "full"):
                row["nvml_series"] = nvml_series(alloc * 1.08 + 0.5, 900.0 * factor)
            if opt == "full" and repeat == 0:
                row["trace_path"] = "traces/full_step.json.gz"
            rows.append(row)
    rows.append(
        train_row(
            H100,
            "ablation",
            run_id,
            "llama3_8b",
            "only_moe_sorted_routing",
            status="skipped",
            error="moe_sorted_routing does not apply to llama (no MoE layers)",
        )
    )
    rows.append(
        train_row(
            H100,
            "ablation",
            run_id,
            "llama3_8b",
            "full_minus_checkpointing",
            status="oom",
            error="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.96 GiB",
        )
    )
    return write_run(root, H100, "ablation", run_id, rows)


def scaling_run(root: Path) -> Path:
    run_id, rows = "golden-scaling", []
    for seq in (512, 1024, 2048, 4096, 8192, 16384):
        for opt, speed, mem in (("baseline", 1.0, 1.0), ("full", 0.8, 0.62)):
            if opt == "baseline" and seq == 16384:
                rows.append(
                    train_row(
                        H100,
                        "scaling",
                        run_id,
                        "llama3_8b",
                        opt,
                        batch=1,
                        seq=seq,
                        status="oom",
                        error="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.91 GiB",
                    )
                )
                continue
            rows.append(
                train_row(
                    H100,
                    "scaling",
                    run_id,
                    "llama3_8b",
                    opt,
                    batch=1,
                    seq=seq,
                    step_ms=230.0 * (seq / 512) ** 1.08 * speed,
                    peak_alloc_gib=17.0 + 0.004 * seq * mem,
                    n_steps=10,
                )
            )
    return write_run(root, H100, "scaling", run_id, rows)


KERNELS = [  # op, (tokens, hidden), bytes per element moved over fwd+bwd, optkit/eager/compile/liger ms
    ("rms_norm", (8192, 4096), 4, (0.125, 0.33, 0.15, 0.14)),
    ("swiglu", (8192, 14336), 7, (0.68, 1.45, 0.80, 0.74)),
    ("rope", (8192, 4096), 4, (0.125, 0.41, 0.16, None)),
    ("cross_entropy", (8192, 128256), 3, (4.9, 11.8, 6.1, 5.2)),
]


def kernels_run(root: Path) -> Path:
    run_id, rows = "golden-kernels", []
    for op, (tokens, hidden), passes, times in KERNELS:
        for impl, ms in zip(("optkit", "eager", "compile", "liger"), times):
            if ms is None:
                rows.append(
                    kernel_row(
                        H100,
                        run_id,
                        op,
                        impl,
                        tokens,
                        hidden,
                        0.0,
                        passes,
                        status="skipped",
                        error="liger-kernel has no standalone rope with this layout",
                    )
                )
                continue
            rows.append(kernel_row(H100, run_id, op, impl, tokens, hidden, ms, passes))
    return write_run(root, H100, "kernels", run_id, rows)


def convergence_run(root: Path) -> Path:
    run_id = "golden-convergence"
    rows = [
        train_row(
            H100,
            "convergence",
            run_id,
            "llama3_2_1b",
            opt,
            batch=8,
            seq=1024,
            step_ms=ms,
            loss_curve=loss_curve(300, offset, opt, "convergence"),
            flops_per_token=6e9,
            method="full",
            peak_alloc_gib=alloc,
        )
        for opt, ms, offset, alloc in (("baseline", 410.0, 0.0, 38.0), ("full", 330.0, 0.004, 26.0))
    ]
    return write_run(root, H100, "convergence", run_id, rows)


E2E = (
    ("baseline", 1.0, 30.0),
    ("compile", 0.91, 28.5),
    ("liger", 0.83, 23.0),
    ("full", 0.78, 21.5),
    ("full_compile", 0.74, 21.0),
)


def e2e_run(root: Path, gpu: dict, speed: float) -> Path:
    run_id = f"golden-e2e-{gpu['gpu_slug']}"
    rows = [
        train_row(gpu, "e2e", run_id, "llama3_8b", opt, step_ms=900.0 * factor * speed, peak_alloc_gib=alloc)
        for opt, factor, alloc in E2E
    ]
    return write_run(root, gpu, "e2e", run_id, rows)


def build_all(root: Path) -> list:
    return [
        smoke_run(root),
        ablation_run(root),
        scaling_run(root),
        kernels_run(root),
        convergence_run(root),
        e2e_run(root, H100, 1.0),
        e2e_run(root, H200, 0.86),
    ]


if __name__ == "__main__":
    for path in build_all(GOLDEN_DIR):
        print(path.relative_to(GOLDEN_DIR))
