"""Kernel-share tables from synthetic Chrome traces (optkit.measure.profile): categories, the region,
launch correlation, optimizer attribution and host self time. Expected numbers are worked out by hand
from the events each test writes."""

import pytest

from optkit.measure import profile as P
from optkit.measure.intervals import clip_intervals, overlap_ms

OURS = frozenset({"_rms_norm_fwd_kernel", "_rope_kernel"})


@pytest.mark.parametrize(
    "name, kind, in_opt, expected",
    [
        ("_rms_norm_fwd_kernel", "kernel", False, "optkit"),
        ("_rope_kernel_0d1d2d3de", "kernel", False, "optkit"),  # older Triton's specialization suffix
        ("_rope_kernel_backward", "kernel", False, "other triton"),  # a different kernel, not a suffix
        ("optkit::rms_norm_fwd", "cpu_op", False, "optkit"),
        (
            "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 64>>(Flash_fwd_params)",
            "kernel",
            False,
            "attention",
        ),
        ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "kernel", False, "attention"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "cpu_op", False, "attention"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "kernel", False, "matmul"),
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT", "kernel", False, "matmul"),
        ("aten::addmm", "cpu_op", False, "matmul"),
        ("aten::add", "cpu_op", False, "elementwise/other"),
        ("autograd::engine::evaluate_function: AddmmBackward0", "cpu_op", False, "matmul"),
        ("CommBackward0", "cpu_op", False, "elementwise/other"),
        ("triton_poi_fused_add_mul_0", "kernel", False, "other triton"),
        ("_swiglu_forward_kernel", "kernel", False, "other triton"),  # Liger's: a Triton kernel, not ours
        (
            "void at::native::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor>(...)",
            "kernel",
            False,
            "optimizer",
        ),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::AUnaryFunctor<float>>(int, ...)",
            "kernel",
            True,
            "optimizer",
        ),  # launched inside Optimizer.step: the optimizer's, whatever the kernel
        ("Memcpy DtoD (Device -> Device)", "gpu_memcpy", False, "copy/memset"),
        ("Memset (Device)", "gpu_memset", False, "copy/memset"),
        (
            "void at::native::elementwise_kernel<128, 4, at::native::direct_copy_kernel_cuda(...)>(int, ...)",
            "kernel",
            False,
            "copy/memset",
        ),
        ("aten::copy_", "cpu_op", False, "copy/memset"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>(int, ...)",
            "kernel",
            False,
            "elementwise/other",
        ),
        (
            "void (anonymous namespace)::softmax_warp_forward<float, float, float, 10, true>(...)",
            "kernel",
            False,
            "elementwise/other",
        ),
    ],
)
def test_categorize(name, kind, in_opt, expected):
    assert P.categorize(name, kind, in_opt, OURS) == expected


def test_optkit_kernel_names_are_read_from_the_kernel_sources():
    names = P.optkit_kernel_names()
    assert {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel", "_rope_kernel"} <= names
    assert P.categorize("_swiglu_bwd_kernel") == "optkit"


def _host(name, ts, dur, cat="cpu_op", tid=1):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid}


def _launch(corr, ts, tid=1, cat="cuda_runtime"):
    return {
        "ph": "X",
        "cat": cat,
        "name": "cudaLaunchKernel",
        "ts": ts,
        "dur": 2,
        "pid": 7,
        "tid": tid,
        "args": {"correlation": corr},
    }


def _kernel(name, corr, ts, dur, cat="kernel"):
    return {
        "ph": "X",
        "cat": cat,
        "name": name,
        "ts": ts,
        "dur": dur,
        "pid": 0,
        "tid": 7,
        "args": {"correlation": corr},
    }


def gpu_trace():
    """Region 1000..2000 us. Pad kernel launched before it; one kernel's device timestamp is foreign."""
    return {
        "traceEvents": [
            _launch(1, 500),
            _kernel("void pad_kernel<1>()", 1, 510, 5),  # before the region: not counted
            _host(P.PROFILED_STEP_REGION, 1000, 1000, cat="user_annotation"),
            _launch(2, 1010),
            _kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 2, 1020, 300),
            _launch(3, 1100),
            _kernel("flash_fwd_kernel", 3, 9.9e9, 200),  # foreign clock: kept by correlation
            _launch(4, 1200),
            _kernel("_rms_norm_fwd_kernel", 4, 1400, 100),
            _launch(5, 1300, cat="cuda_driver"),
            _kernel("triton_red_fused_sum_0", 5, 1500, 50),
            _launch(6, 1320),
            _kernel("Memcpy HtoD (Pageable -> Device)", 6, 1560, 50, cat="gpu_memcpy"),
            _host("Optimizer.step#AdamW.step", 1700, 200, cat="user_annotation"),
            _launch(7, 1750),
            _kernel("void at::native::vectorized_elementwise_kernel<4, Mul>()", 7, 1760, 80),
            _launch(8, 1800),
            _kernel("void at::native::vectorized_elementwise_kernel<4, Mul>()", 8, 1850, 20),
            _kernel("gpu annotation copy", 99, 1010, 990, cat="gpu_user_annotation"),  # not work
            _launch(9, 1990),
            _kernel("void at::native::vectorized_elementwise_kernel<4, Add>()", 9, 1995, 200),
            _launch(10, 2100),
            _kernel("sm90_xmma_gemm_after", 10, 2110, 1000),  # launched after the region
        ]
    }


def test_device_share_counts_only_work_launched_in_the_region():
    fields = P.summarize_trace(gpu_trace(), on_cuda=True)
    share = {r["category"]: r for r in fields["profile_kernel_share"]}
    assert [r["category"] for r in fields["profile_kernel_share"]] == list(P.CATEGORIES)
    total_us = 300 + 200 + 100 + 50 + 50 + 80 + 20 + 200
    assert fields["profile_step_ms"] == pytest.approx(total_us / 1e3)
    expected_us = {
        "matmul": 300,
        "attention": 200,
        "optkit": 100,
        "other triton": 50,
        "copy/memset": 50,
        "optimizer": 100,
        "elementwise/other": 200,
    }
    for category, us in expected_us.items():
        assert share[category]["time_ms"] == pytest.approx(us / 1e3), category
        assert share[category]["share_pct"] == pytest.approx(100 * us / total_us, abs=0.01), category
    assert sum(r["share_pct"] for r in share.values()) == pytest.approx(100, abs=0.05)
    assert fields["profile_time_source"] == P.TIME_SOURCE_CUDA


def test_top_kernels_group_by_name_and_rank_by_time():
    top = P.summarize_trace(gpu_trace(), on_cuda=True)["profile_top_kernels"]
    assert top[0] == {"name": "sm90_xmma_gemm_bf16bf16_bf16f32", "category": "matmul", "calls": 1, "total_ms": 0.3}
    mul = [t for t in top if "Mul" in t["name"]]
    assert mul == [
        {
            "name": "void at::native::vectorized_elementwise_kernel<4, Mul>()",
            "category": "optimizer",
            "calls": 2,
            "total_ms": 0.1,
        }
    ]
    assert all("pad" not in t["name"] and "after" not in t["name"] for t in top)
    events = [P.TimedEvent("k" * 500, "kernel", 1.0, False)] + [
        P.TimedEvent(f"k{i}", "kernel", 2.0, False) for i in range(20)
    ]
    top = P.top_kernels(events, n=15)
    assert len(top) == 15 and all(len(t["name"]) <= P.NAME_CHARS for t in top)
    assert "kkkk" not in "".join(t["name"] for t in top), "the shortest-time name ranks last and is cut"


def test_host_self_time_subtracts_direct_children_per_thread():
    trace = {
        "traceEvents": [
            _host(P.PROFILED_STEP_REGION, 0, 1000, cat="user_annotation"),
            _host("aten::linear", 10, 300),
            _host("aten::t", 12, 20),
            _host("aten::addmm", 40, 250),
            _host("aten::copy_", 50, 30),  # child of addmm: addmm's self time is 250 - 30
            _host("optkit::rms_norm_fwd", 400, 100),
            _host("Optimizer.step#AdamW.step", 600, 200, cat="user_annotation"),
            _host("aten::add_", 650, 50),  # inside the optimizer's step
            _host("aten::mul", 100, 400, tid=2),  # another thread (autograd's): its own stack
            _host("aten::mm", 110, 100, tid=2),
            _host("aten::mm", 1200, 500),  # after the region
        ]
    }
    fields = P.summarize_trace(trace, on_cuda=False)
    share = {r["category"]: r["time_ms"] * 1e3 for r in fields["profile_kernel_share"]}
    assert share["matmul"] == pytest.approx((300 - 20 - 250) + (250 - 30) + 100)
    assert share["copy/memset"] == pytest.approx(30)
    assert share["optkit"] == pytest.approx(100)
    assert share["optimizer"] == pytest.approx(200)  # the range's own 150 us + add_'s 50 us
    assert share["elementwise/other"] == pytest.approx(20 + 300)  # aten::t, and mul minus its mm
    assert fields["profile_step_ms"] == pytest.approx(sum(share.values()) / 1e3)
    assert fields["profile_time_source"] == P.TIME_SOURCE_CPU


def split_trace():
    """Region 1000..2000 us; first launch at 1100. Compute stream: gemm 1110-1400, rms 1450-1480, add 1995-2100
    (runs past the region's end: clipped to 2000). Copy stream: HtoD 1300-1500 (kernels beside it 1300-1400 and
    1450-1480: 130 of 200 us), DtoH 1700-1800 with only a memset beside it (a memset is not compute)."""
    return {
        "traceEvents": [
            _launch(1, 500),
            _kernel("void pad_kernel<1>()", 1, 510, 5),  # before the region: not counted
            _host(P.PROFILED_STEP_REGION, 1000, 1000, cat="user_annotation"),
            _launch(2, 1100),
            _kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 2, 1110, 290),
            _launch(3, 1120),
            _kernel("Memcpy HtoD (Pinned -> Device)", 3, 1300, 200, cat="gpu_memcpy"),
            _launch(4, 1150),
            _kernel("_rms_norm_fwd_kernel", 4, 1450, 30),
            _launch(5, 1600),
            _kernel("Memcpy DtoH (Device -> Pinned)", 5, 1700, 100, cat="gpu_memcpy"),
            _launch(6, 1610),
            _kernel("Memset (Device)", 6, 1750, 10, cat="gpu_memset"),
            _launch(7, 1620),
            _kernel("flash_fwd_kernel", 7, 9.9e9, 50),  # foreign clock: outside the step, left out
            _kernel("gpu annotation copy", 99, 1000, 1000, cat="gpu_user_annotation"),  # not work
            _launch(8, 1990),
            _kernel("void at::native::vectorized_elementwise_kernel<4, Add>()", 8, 1995, 105),
            _launch(9, 2100),
            _kernel("sm90_xmma_gemm_after", 9, 2110, 1000),  # launched after the region
        ]
    }


def test_device_split_sets_the_busy_union_against_the_wall_from_the_first_launch():
    fields = P.summarize_trace(split_trace(), on_cuda=True)
    busy_us = (1500 - 1110) + (1800 - 1700) + (2000 - 1995)  # gemm+copy+rms merged, DtoH (memset inside), add
    assert fields["profile_step_wall_ms"] == pytest.approx((2000 - 1100) / 1e3)
    assert fields["profile_device_busy_ms"] == pytest.approx(busy_us / 1e3)
    assert fields["profile_device_idle_share"] == pytest.approx(1 - busy_us / 900, abs=1e-4)


def test_device_split_gives_each_copy_direction_its_busy_time_and_overlap_with_kernels():
    fields = P.summarize_trace(split_trace(), on_cuda=True)
    assert fields["profile_htod_busy_ms"] == pytest.approx(0.2)
    assert fields["profile_htod_overlap_fraction"] == pytest.approx((100 + 30) / 200)
    assert fields["profile_dtoh_busy_ms"] == pytest.approx(0.1)
    assert fields["profile_dtoh_overlap_fraction"] == 0.0


def test_device_split_without_copies_or_without_cuda_is_none():
    no_copies = {
        "traceEvents": [
            _host(P.PROFILED_STEP_REGION, 0, 100, cat="user_annotation"),
            _launch(1, 10),
            _kernel("gemm", 1, 20, 30),
        ]
    }
    fields = P.summarize_trace(no_copies, on_cuda=True)
    assert fields["profile_device_busy_ms"] == pytest.approx(0.03) and fields["profile_step_wall_ms"] == 0.09
    assert all(fields[f"profile_{d}_{f}"] is None for d in ("htod", "dtoh") for f in ("busy_ms", "overlap_fraction"))
    on_cpu = P.summarize_trace(
        {"traceEvents": [_host(P.PROFILED_STEP_REGION, 0, 100, cat="user_annotation"), _host("aten::mm", 10, 50)]},
        on_cuda=False,
    )
    assert all(on_cpu[f] is None for f in P.DEVICE_SPLIT_FIELDS) and on_cpu["profile_time_source"] == P.TIME_SOURCE_CPU


def test_overlap_is_the_intersection_of_the_two_unions():
    copies = [(30, 60), (0, 20), (10, 25)]  # unsorted and overlapping: union 0-25, 30-60
    kernels = [(5, 40), (35, 50), (55, 100)]  # union 5-50, 55-100
    assert overlap_ms(copies, kernels) * 1e3 == pytest.approx((25 - 5) + (50 - 30) + (60 - 55))
    assert overlap_ms(copies, []) == 0.0
    assert clip_intervals([(0, 10), (5, 30), (40, 50)], 8, 35) == [(8, 10), (8, 30)]


def test_a_trace_without_the_region_is_an_error_that_says_so():
    with pytest.raises(P.ProfileError, match="record_function"):
        P.summarize_trace({"traceEvents": [_host("aten::mm", 0, 10)]}, on_cuda=False)
    empty_region = {"traceEvents": [_host(P.PROFILED_STEP_REGION, 0, 10, cat="user_annotation")]}
    with pytest.raises(P.ProfileError, match="no device events"):
        P.summarize_trace(empty_region, on_cuda=True)


@pytest.mark.gpu
def test_profile_step_on_cuda_attributes_matmuls_and_the_optimizer(tmp_path):
    """A real profiled step (Llama-8B-sized MLP block, bf16, fused AdamW): the trace's device events
    land in matmul and optimizer, the pad launches before the region are not counted."""
    import gzip
    import json

    import torch

    device = torch.device("cuda")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(4096, 14336, bias=False), torch.nn.SiLU(), torch.nn.Linear(14336, 4096, bias=False)
    ).to(device, torch.bfloat16)
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=1e-4, fused=True)
    x = torch.randn(8192, 4096, device=device, dtype=torch.bfloat16)

    def step():
        mlp(x).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)

    step()  # warm-up: cuBLAS handles, optimizer state
    fields = P.profile_step(step, device, tmp_path / "traces" / "mlp-r0.json.gz")
    with gzip.open(tmp_path / "traces" / "mlp-r0.json.gz", "rt") as fh:
        assert json.load(fh)["traceEvents"]
    share = {s["category"]: s["share_pct"] for s in fields["profile_kernel_share"]}
    assert fields["profile_time_source"] == P.TIME_SOURCE_CUDA
    assert sum(share.values()) == pytest.approx(100, abs=0.1)
    assert share["matmul"] > 60, share  # 3 matmuls fwd+bwd of 8192x4096x14336 dominate
    assert share["optimizer"] > 0, share
    assert all("pad" not in t["name"] for t in fields["profile_top_kernels"])
    assert fields["profile_top_kernels"][0]["category"] == "matmul"
    # ~9 TFLOP of matmuls behind a few dozen launches: the device, not the host, sets this step's time
    assert 0 < fields["profile_device_busy_ms"] <= fields["profile_step_wall_ms"], fields
    assert fields["profile_device_idle_share"] < 0.5, fields
