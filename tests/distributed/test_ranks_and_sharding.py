"""In-process checks of the distributed pieces (no launch): merging the ranks' rows, reading a failed launch,
the launch command, the config rules, and FSDP2 on a one-process gloo group (patch then fully_shard trains
as the unsharded model does; fully_shard then patch is refused)."""

import json
import math

import pytest
import torch

from optkit.bench.launch import failure_cause, point_command, rank_failure_rows, skip_reason
from optkit.bench.ranks import merge_ranks, rank_rows_file, write_rank_failure
from optkit.config.compose import ConfigError, compose
from optkit.results.rows import setting_key
from optkit.train.distributed import rows_of

# ----------------------------------------------------------------------------- merging rows


def _rank_row(rank: int, **extra):
    row = {
        "status": "ok",
        "step_ms": 100.0 + rank,
        "step_times_ms": [100.0, 100.0],
        "tokens_per_step": 64.0,
        "padded_tokens_per_step": 64.0,
        "peak_allocated_bytes": [5, 9, 7][rank],
        "peak_reserved_bytes": 10,
        "peak_nvml_device_bytes": [30, 20, 40][rank],
        "peak_nvml_timed_device_bytes": None,
        "peak_rss_bytes": 1000 + rank,
        "timed_energy_j": 2.0,
        "energy_mj": 3.0,
        "avg_power_w": 50.0,
        "flops_per_token": 1e9,
        "hw_flops_per_token": 1.5e9,
        "peak_tflops": 1.0,
        "loss_curve": [float(rank), 2.0 * rank],
    }
    row.update(extra)
    return row


def test_merge_is_max_of_memory_sum_of_tokens_and_energy_and_mean_of_loss():
    merged = merge_ranks([_rank_row(r) for r in range(3)])
    assert merged["world_size"] == 3
    assert merged["peak_allocated_bytes"] == 9 and merged["peak_allocated_bytes_per_rank"] == [5, 9, 7]
    assert merged["peak_nvml_device_bytes"] == 40 and merged["peak_nvml_device_bytes_per_rank"] == [30, 20, 40]
    assert merged["peak_nvml_timed_device_bytes"] is None  # no rank had it: no invented figure
    assert merged["step_ms"] == 100.0 and merged["step_ms_per_rank"] == [100.0, 101.0, 102.0]
    assert merged["tokens_per_step"] == 192.0
    assert math.isclose(merged["tokens_per_s"], 192.0 / 0.1)
    assert math.isclose(merged["tokens_per_s_per_gpu"], 64.0 / 0.1)
    # MFU against one GPU's peak: per-GPU tokens x FLOPs per token / 1 TFLOP/s
    assert math.isclose(merged["mfu"], 640.0 * 1e9 / 1e12)
    assert math.isclose(merged["timed_energy_j"], 6.0) and math.isclose(merged["avg_power_w"], 150.0)
    assert math.isclose(merged["energy_j_per_token"], 6.0 / (192.0 * 2))
    assert merged["loss_curve"] == [1.0, 2.0] and merged["loss_last"] == 2.0
    assert merged["comm_share"] is None  # no profile: the profiler cannot tell


def test_comm_share_is_the_step_share_with_nccl_kernels_running(tmp_path):
    """A made-up profiled step of 10 ms: NCCL 0-4 ms, a GEMM 2-6 ms: comm 40% of the step, exposed 20%."""
    import gzip

    from optkit.bench.ranks import comm_fields
    from optkit.measure.profile import PROFILED_STEP_REGION

    def kernel(name, start_us, dur_us, correlation):
        launch = {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1.0, "dur": 1.0}
        launch["args"] = {"correlation": correlation}
        return [launch, {"cat": "kernel", "name": name, "ts": start_us, "dur": dur_us, "args": dict(launch["args"])}]

    events = [{"cat": "user_annotation", "name": PROFILED_STEP_REGION, "ts": 0.0, "dur": 10_000.0}]
    events += kernel("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 0.0, 4000.0, 1)
    events += kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 2000.0, 4000.0, 2)
    with gzip.open(tmp_path / "step.json.gz", "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    row = {"profile_step_wall_ms": 10.0, "trace_path": "step.json.gz"}
    assert comm_fields(row, tmp_path) == {"comm_share": 0.4, "comm_exposed_share": 0.2}
    assert comm_fields(dict(row, trace_path=None), tmp_path)["comm_share"] is None


def test_rows_of_a_batch_split_the_real_tokens_by_trained_labels():
    from optkit.data import make_batches

    data = compose(["data.pad_fraction=0.25", "data.seq_len=16"]).data
    (batch,) = make_batches(data, 4, 512, 1, seed=3)
    halves = [rows_of(batch, 0, 2), rows_of(batch, 2, 2)]
    assert [h.tensors["input_ids"].shape[0] for h in halves] == [2, 2]
    assert torch.equal(torch.cat([h.tensors["input_ids"] for h in halves]), batch.tensors["input_ids"])
    assert sum(h.real_tokens for h in halves) == batch.real_tokens == 4 * 12
    assert sum(h.padded_tokens for h in halves) == batch.padded_tokens


# ----------------------------------------------------------------------------- reading a failed launch

# What torchrun prints when rank 1 was killed by SIGABRT and rank 0 then failed on the broken connection.
TORCHRUN_REPORT = """
Failures:
[1]:
  time      : 2026-12-06_20:03:27
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -6 (pid: 1002)
  error_file: <N/A>
  traceback : Signal 6 (SIGABRT) received by PID 1002
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-06_20:03:27
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 1001)
  error_file: <N/A>
"""


def test_the_crashed_rank_is_the_cause_not_the_peer_that_lost_it(tmp_path):
    out = tmp_path / "rows.json"
    write_rank_failure(out, 0, [{"status": "error", "error": "rank 0: Connection closed by peer"}])
    assert failure_cause(TORCHRUN_REPORT).startswith("rank 1 aborted")
    assert rank_failure_rows(out, TORCHRUN_REPORT) is None  # the row says rank 1 crashed, not rank 0's echo
    # without a crash, the first rank that failed and wrote its rows is the point's row
    write_rank_failure(out, 1, [{"status": "oom", "error": "rank 1: CUDA out of memory"}])
    first = json.loads(rank_rows_file(out, 0).read_text())
    first["failed_at"] += 10.0
    rank_rows_file(out, 0).write_text(json.dumps(first))
    assert rank_failure_rows(out, "")[0]["status"] == "oom"
    assert failure_cause("Traceback ...\nValueError: x") is None


def test_a_distributed_point_is_launched_by_torchrun_with_one_process_per_gpu():
    single = point_command({"train": {"distributed": "none"}, "bench": {"gpus": 1}}, ["--out", "x"])
    assert single[1:] == ["-m", "optkit.bench.point", "--out", "x"]
    cmd = point_command({"train": {"distributed": "fsdp2"}, "bench": {"gpus": 4}}, ["--out", "x"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4" and cmd[-4:] == ["-m", "optkit.bench.point", "--out", "x"]
    wants_8 = {"train": {"distributed": "ddp"}, "bench": {"gpus": 8, "device": "auto"}}
    assert "8" in skip_reason(wants_8, visible_gpus=2)
    assert skip_reason(wants_8, visible_gpus=8) is None
    assert skip_reason(wants_8, visible_gpus=None) is None  # no CUDA: 8 gloo processes on the CPU


def test_several_gpus_need_a_distributed_mode_and_the_mode_is_in_the_keys():
    from optkit.config.checks import check_point

    with pytest.raises(ConfigError, match="train.distributed=ddp"):
        check_point(compose(["bench.gpus=2"]))
    with pytest.raises(ConfigError, match="none, ddp, fsdp2"):
        compose(["train.distributed=zero3"])
    from omegaconf import OmegaConf

    two = OmegaConf.to_container(compose(["train.distributed=fsdp2", "bench.gpus=2"]), resolve=True)
    one = OmegaConf.to_container(compose([]), resolve=True)
    assert setting_key(two).endswith("/fsdp2-x2") and "fsdp2" not in setting_key(one)


def test_what_a_launch_cannot_run_is_a_skip_reason_naming_the_fix(monkeypatch):
    from optkit.train import distributed

    fsdp2_qlora = compose(["train=qlora", "train.distributed=fsdp2"]).train
    assert "bench.gpus=N" in distributed.unsupported_reason(fsdp2_qlora)  # not started by torchrun
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert distributed.unsupported_reason(fsdp2_qlora) is None
    monkeypatch.setattr(distributed, "_torch_version", lambda: (2, 11))
    reason = distributed.unsupported_reason(fsdp2_qlora)
    assert "torch>=2.12" in reason and "bnb_4bit_quant_storage" in reason and "NF4Tensor" in reason
    eight_bit = compose(["train.distributed=fsdp2", "train.optimizer=adamw_8bit"]).train
    assert "train.optimizer=adamw" in distributed.unsupported_reason(eight_bit)
    assert distributed.unsupported_reason(compose([]).train) is None


# ----------------------------------------------------------------------------- FSDP2 in one process


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _patched_model(method: str, opt: str = "full", *overrides: str):
    from optkit.opt import patcher
    from tests.train._tiny import tiny_model

    net, _ = tiny_model("tiny_llama", method)
    return patcher.patch(net, compose([f"opt={opt}", *overrides]).opt)


def _train(net, steps: int = 2):
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(steps):
        loss = net(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_patch_then_fully_shard_trains_as_the_unsharded_model(method, one_process_group):
    """FSDP2 replaces every parameter (QLoRA's uint8 packed weights too) with a sharded DTensor and puts plain
    gathered tensors on the modules in forward: fused LoRA and the NF4 path must read those, not what they
    held at patch time (stale adapters would never train; a packed weight without quant_state would fail)."""
    from torch.distributed.tensor import DTensor

    from optkit.train.distributed import shard

    # Under FSDP2 dense Q/K/V and gate/up run one GEMM per projection (each weight is gathered on its own): the
    # reference does the same, so both sum in one order and the comparison stays tight.
    ungrouped = "opt.fused_lora_grouped_gemm=false"
    reference = _patched_model(method, "full", ungrouped)
    reference_losses = _train(reference)
    sharded = shard(_patched_model(method, "full", ungrouped), mixed_precision=False)
    adapters = {n: p for n, p in sharded.named_parameters() if p.requires_grad}
    assert adapters and all(isinstance(p, DTensor) for p in adapters.values())
    losses = _train(sharded)
    assert losses[0] != losses[-1]
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    trained = dict(reference.named_parameters())
    for name, param in adapters.items():
        torch.testing.assert_close(param.full_tensor(), trained[name].detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "opt, modes", [("baseline", ("standard", "offload", "offload_double_buffer")), ("full", ("offload_double_buffer",))]
)
def test_checkpointing_modes_under_fsdp2_and_ddp_train_as_without_them(opt, modes, one_process_group):
    """HF's checkpointing recomputes a layer inside FSDP2's gather; optkit's offload modes pass the layer's
    parameters, read in forward (the gathered ones), to their Function; both must reach the same losses."""
    from optkit.train.checkpointing import enable_checkpointing
    from optkit.train.distributed import distribute

    reference = _train(_patched_model("lora", opt))
    for mode in modes:
        for distributed in ("fsdp2", "ddp"):
            net = _patched_model("lora", opt)
            enable_checkpointing(net, mode)
            net.train()
            net = distribute(net, compose([f"train.distributed={distributed}"]).train, torch.device("cpu"))
            assert _train(net) == pytest.approx(reference, rel=1e-5), (mode, distributed)


def test_ddp_qlora_trains_as_the_plain_model(one_process_group):
    from optkit.train.distributed import distribute

    reference_losses = _train(_patched_model("qlora", "baseline"))
    wrapped = distribute(
        _patched_model("qlora", "baseline"), compose(["train.distributed=ddp"]).train, torch.device("cpu")
    )
    assert wrapped.config.model_type == "llama"  # the wrapper reads through to the model
    assert _train(wrapped) == pytest.approx(reference_losses, rel=1e-5)


def test_fully_shard_then_patch_is_refused(one_process_group):
    from optkit.opt import patcher
    from optkit.train.distributed import shard
    from tests.train._tiny import tiny_model

    net, _ = tiny_model("tiny_llama", "lora")
    shard(net, mixed_precision=False)
    with pytest.raises(RuntimeError, match="before fully_shard"):
        patcher.patch(net, compose(["opt=full"]).opt)


def test_sharded_init_builds_on_meta_and_initializes_the_shards_as_a_plain_build(one_process_group):
    """train.sharded_init: nothing left on the meta device, buffers (rotary frequencies) as a plain build's,
    weights at the family's init scale, LoRA A random and B zero as peft starts them, and the model trains."""
    from optkit.bench.setup import build_patched_model
    from optkit.models import build_model
    from optkit.train.distributed import build_device, distribute

    cfg = compose(["model=tiny_llama", "train=lora", "train.distributed=fsdp2", "train.sharded_init=true"])
    cpu = torch.device("cpu")
    model, _ = build_patched_model(cfg, build_device(cfg.train, cpu))
    assert all(p.device.type == "meta" for p in model.parameters())
    model = distribute(model, cfg.train, cpu)
    tensors = dict(model.named_parameters())
    assert not [n for n, p in tensors.items() if p.device.type == "meta"]
    plain = build_model(cfg.model, cpu)
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(model.get_buffer(f"base_model.model.{name}"), buffer)
    base = tensors["base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"].full_tensor()
    assert abs(base.std().item() - cfg.model.hf_config.get("initializer_range", 0.02)) < 0.005
    lora = {n: p.full_tensor() for n, p in tensors.items() if "lora_" in n}
    assert all((p == 0).all() for n, p in lora.items() if "lora_B" in n)
    assert all(p.std() > 0 for n, p in lora.items() if "lora_A" in n)
    losses = _train(model, steps=3)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
