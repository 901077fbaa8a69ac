"""Points on two gloo processes through the runner (torchrun, CPU): ok rows whose loss curve is the one a
single process computes on the same global batch, FSDP2 with optkit's `full` opt-set and DDP without it; a
rank that dies is the point's error row, naming the rank, and the sweep goes on. (QLoRA under FSDP2 and
DDP, and the order of patch and fully_shard: test_ranks_and_sharding.py, in one process.)"""

from pathlib import Path

import pytest
import torch

from optkit.bench import runner
from optkit.bench.point import run_point
from optkit.config.compose import compose, typed_config
from optkit.results.rows import read_rows

PER_RANK_BATCH = 1
# lr 0.01: three steps move the loss ~2e-3 relative (at the default 1e-4, 2e-5: below LOSS_RTOL, so adapters
# that never trained would pass)
STEPS = ["train.warmup_steps=1", "train.steps=2", "data.seq_len=16", "train.lr=0.01", "bench.progress=false"]
# fp32 tiny models: the ranks' reductions sum in another order than one process does, nothing more
LOSS_RTOL = 1e-4
# bf16 on GPUs: FSDP2 computes the fp32 LoRA adapters in bf16 (MixedPrecisionPolicy), one process in fp32
GPU_LOSS_RTOL = 1e-2
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="gloo processes on the CPU (GPU: the gpu tests)")


def _single_process_losses(point):
    """The loss curve of one process training on both ranks' rows at once."""
    overrides = [*point, *STEPS, f"train.batch_size={2 * PER_RANK_BATCH}"]
    (row,) = run_point(typed_config(compose(overrides)), overrides)
    assert row["status"] == "ok", row["error"]
    return row["loss_curve"]


def _two_ranks(mode):
    return [f"train.distributed={mode}", "bench.gpus=2", f"train.batch_size={PER_RANK_BATCH}"]


def _check_against_one_process(row, point):
    assert row["status"] == "ok", row["error"]
    assert row["world_size"] == 2 and row["dist_backend"] == "gloo"
    assert row["tokens_per_step"] == 2 * PER_RANK_BATCH * 16  # both ranks' tokens
    assert row["tokens_per_s_per_gpu"] == pytest.approx(row["tokens_per_s"] / 2)
    assert len(row["step_ms_per_rank"]) == 2 and len(row["peak_rss_bytes_per_rank"]) == 2
    assert row["peak_rss_bytes"] == max(row["peak_rss_bytes_per_rank"])
    reference = _single_process_losses(point)
    assert reference[0] != reference[-1]  # the steps train: equal curves are not two untrained models
    assert row["loss_curve"] == pytest.approx(reference, rel=LOSS_RTOL)


@cpu_only
def test_fsdp2_point_with_optkits_kernels_trains_as_one_process_on_the_global_batch(tmp_path):
    point = ["model=tiny_llama", "opt=full", "train=lora"]  # fused LoRA reads the adapters FSDP2 gathers
    overrides = [*point, *STEPS, *_two_ranks("fsdp2")]
    (row,) = runner.run_isolated(overrides, "test", [0], timeout_s=240, point_cfg=compose(overrides), run_dir=tmp_path)
    assert row["distributed"] == "fsdp2" and row["setting_key"].endswith("fsdp2-x2")
    assert {"fused_lora", "rms_norm", "fused_linear_cross_entropy"} <= set(row["applied_optimizations"])
    _check_against_one_process(row, point)


@cpu_only
def test_a_dead_rank_is_an_error_row_naming_it_and_the_ddp_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTKIT_INJECT_FAULT", "crash@tiny_qwen3")
    monkeypatch.setenv("OPTKIT_INJECT_FAULT_RANK", "1")
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    overrides = ["suite=smoke", "model=tiny_qwen3,tiny_llama", "opt=baseline", *STEPS, *_two_ranks("ddp")]
    run_dir = runner.run_sweep([f"bench.results_dir={tmp_path}", *overrides])
    crashed, ok = read_rows(run_dir / "results.jsonl")
    assert crashed["model"] == "tiny_qwen3" and crashed["status"] == "error"
    assert crashed["error"].startswith("rank 1 aborted"), crashed["error"][:300]
    assert crashed["world_size"] == 2 and crashed["distributed"] == "ddp"
    assert ok["model"] == "tiny_llama" and ok["distributed"] == "ddp"
    _check_against_one_process(ok, ["model=tiny_llama", "opt=baseline", "train=lora"])


@pytest.mark.gpu
@pytest.mark.parametrize("mode, gpus", [("fsdp2", 1), ("fsdp2", 2), ("ddp", 2)])
def test_gpu_point_trains_as_one_process_on_the_global_batch(mode, gpus, tmp_path):
    """NCCL, one process per GPU, bf16: the loss curve of a plain one-process point on the global batch."""
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    point = ["model=tiny_llama", "model.dtype=bfloat16", "opt=full", "train=lora", *STEPS]
    overrides = [*point, f"train.distributed={mode}", f"bench.gpus={gpus}", "train.batch_size=2"]
    (row,) = runner.run_isolated(overrides, "test", [0], timeout_s=300, point_cfg=compose(overrides), run_dir=tmp_path)
    assert row["status"] == "ok", row["error"]
    assert row["dist_backend"] == "nccl" and row["world_size"] == gpus
    assert len(row["peak_allocated_bytes_per_rank"]) == gpus and row["peak_allocated_bytes"] > 0
    plain = [*point, f"train.batch_size={2 * gpus}"]
    (reference,) = runner.run_isolated(plain, "test", [0], timeout_s=300, point_cfg=compose(plain), run_dir=tmp_path)
    assert reference["status"] == "ok", reference["error"]
    assert row["tokens_per_step"] == reference["tokens_per_step"]
    assert row["loss_curve"] == pytest.approx(reference["loss_curve"], rel=GPU_LOSS_RTOL)
