"""CPU tests of the kernel benchmark harness (optkit/bench/kernels/run.py): the sweep, byte counts, rows,
implementation discovery, failure rows, fresh inputs per repeat, compile caching, the device-time
pass (trace parsing on synthetic events, its plumbing with a scripted trace), the FLCE chunk sweep,
the forward-only NF4 dequantize op (its cases, bytes, bitwise correctness, rows without a backward),
the command line, and a tiny run.

Byte counts are checked against the nbytes of real tensors (inputs, outputs, gradients) rather
than against the formulas they test. Timing uses a fake timer and a fake trace wherever numbers
are asserted.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import types

import pytest
import torch

from optkit.bench.kernels import cases as kernel_cases
from optkit.bench.kernels import context as kernel_context
from optkit.bench.kernels import device_pass
from optkit.bench.kernels import impls as kernel_impls
from optkit.bench.kernels import ops as kernel_ops
from optkit.bench.kernels import phases as kernel_phases
from optkit.bench.kernels import rows as kernel_rows
from optkit.bench.kernels import run as kernel_run
from optkit.bench.kernels import table as kernel_table
from optkit.measure import device_timing, device_trace, intervals
from optkit.results import rows as result_rows
from optkit.results.rows import read_rows

CPU = torch.device("cpu")
# The fields every kernel row must carry (what the report and the gate read).
REQUIRED_FIELDS = (
    "schema_version run_id suite kind status error op impl dtype shape tokens hidden fwd_ms bwd_ms full_ms "
    "full_ms_p10 full_ms_p90 full_times_ms bytes_full gbps_full copy_gbps frac_of_copy peak_bytes "
    "peak_delta_bytes loss_in_forward gpu_name gpu_slug torch triton git_sha point_key timestamp "
    "fwd_device_ms bwd_device_ms full_device_ms gbps_device frac_of_copy_device n_kernels_full device_error"
).split()
FAKE_ENV = {
    "gpu_name": None,
    "torch_version": torch.__version__,
    "triton_version": "x",
    "git_sha": "abc",
    "git_dirty": False,
    "liger_kernel_version": None,
}


class FakeTimer:
    """PhaseTimer's interface with scripted times: step i of every loop takes 1 + i ms."""

    def __init__(self, device):
        self.steps = 0

    def begin_step(self):
        pass

    def mark(self, phase):
        pass

    def end_step(self):
        self.steps += 1

    def results(self):
        return [
            {"forward_ms": 0.25 * (1 + i), "backward_ms": 0.75 * (1 + i), "step_ms": 1.0 + i} for i in range(self.steps)
        ]


def _context(timer_factory=FakeTimer, settings=kernel_run.SMOKE_SETTINGS, copy_gbps=100.0, compile_cache=None):
    return kernel_context.RunContext(
        run_id="t",
        device=CPU,
        env=FAKE_ENV,
        env_fields=result_rows.env_stamp(FAKE_ENV),
        settings=settings,
        flush=device_timing.L2Flush(CPU),
        copy_gbps=copy_gbps,
        compile_cache=compile_cache or kernel_impls.CompileCache("no compile in this test"),
        timer_factory=timer_factory,
    )


def _case(op):
    return next(c for c in kernel_cases.smoke_cases((op,)))


def _resolve(impl, case, dtype, cache=None):
    return kernel_impls.resolve_impl(
        impl, kernel_ops.SPECS[case.op], case, CPU, cache or kernel_impls.CompileCache(None), dtype
    )


# --------------------------------------------------------------------------- the sweep


def test_sweep_covers_the_published_shapes_once():
    cases = kernel_cases.sweep_cases()
    shapes = [(c.op, c.shape) for c in cases]
    assert len(shapes) == len(set(shapes)), "a shape shared by two models must appear once"
    by_op = {op: [c for c in cases if c.op == op] for op in kernel_cases.OPS}
    assert {c.dims["H"] for c in by_op["rms_norm"]} == {4096, 3584}
    assert {c.tokens for c in by_op["rms_norm"]} == set(kernel_cases.TOKENS)
    assert {(c.dims["Hq"], c.dims["Hkv"], c.dims["D"]) for c in by_op["rope"]} == {(32, 8, 128), (16, 8, 256)}
    assert all(c.dims["B"] * c.dims["S"] == c.tokens for c in by_op["rope"])
    assert {c.dims["I"] for c in by_op["swiglu"]} == {14336, 12288}
    assert [c.params["approximate"] for c in by_op["geglu"]] == ["tanh"] * len(kernel_cases.TOKENS)
    assert {(c.dims["V"], c.params["softcap"]) for c in by_op["cross_entropy"]} == {
        (128256, None),
        (151936, None),
        (256000, 30.0),
    }
    assert {c.tokens for c in by_op["cross_entropy"]} == {4096, 8192}
    (flce,) = by_op["fused_linear_cross_entropy"]
    assert (flce.tokens, flce.dims["H"], flce.dims["V"]) == (8192, 4096, 128256)
    gemma_norm = next(c for c in by_op["rms_norm"] if c.dims["H"] == 3584)
    assert (gemma_norm.params["cast_mode"], gemma_norm.params["offset"]) == ("gemma", 1.0)


def test_quick_sweep_is_one_shape_per_op():
    cases = kernel_cases.sweep_cases(quick=True)
    assert sorted(c.op for c in cases) == sorted(kernel_cases.OPS)


def test_compile_group_ignores_only_token_dims():
    cases = [c for c in kernel_cases.sweep_cases() if c.op == "rope"]
    groups = {c.compile_group for c in cases}
    assert groups == {("rope", "Hq32xHkv8xD128"), ("rope", "Hq16xHkv8xD256")}
    ce = {c.compile_group for c in kernel_cases.sweep_cases(ops=("cross_entropy",))}
    assert ("cross_entropy", "V256000-softcap30") in ce and len(ce) == 3


def test_unknown_op_is_a_clear_error():
    with pytest.raises(ValueError, match="choose from"):
        kernel_cases.sweep_cases(ops=("rmsnorm",))


# --------------------------------------------------------------------------- byte counts


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_bytes_match_the_tensors_it_must_touch(dtype):
    case = kernel_cases.Case("rms_norm", "t", {"T": 7, "H": 40}, {"eps": 1e-6, "offset": 0.0, "cast_mode": "llama"})
    t = kernel_ops.SPECS["rms_norm"].make_inputs(case, dtype, CPU)
    y = kernel_ops._eager_rms_norm(t["x"], t["weight"], 1e-6, 0.0, "llama")
    rstd = torch.empty(7, dtype=torch.float32)
    fwd, bwd = kernel_ops.SPECS["rms_norm"].bytes_moved(case, dtype.itemsize)
    assert fwd == _nbytes(t["x"], t["weight"], y, rstd)
    assert bwd == _nbytes(y, t["x"], t["weight"], rstd) + _nbytes(t["x"], t["weight"])  # dy,x,w,rstd -> dx,dw


def test_rope_bytes_match_the_tensors_it_must_touch():
    case = kernel_cases.Case("rope", "t", {"T": 12, "B": 2, "S": 6, "Hq": 4, "Hkv": 2, "D": 8})
    t = kernel_ops.SPECS["rope"].make_inputs(case, torch.bfloat16, CPU)
    q2, k2 = kernel_ops._eager_rope(t["q"], t["k"], t["cos"], t["sin"])
    fwd, bwd = kernel_ops.SPECS["rope"].bytes_moved(case, 2)
    assert fwd == _nbytes(t["q"], t["k"], t["cos"], t["sin"], q2, k2)
    assert bwd == fwd  # dq', dk', cos, sin -> dq, dk


@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_gated_bytes_match_the_tensors_it_must_touch(op):
    case = kernel_cases.Case(op, "t", {"T": 5, "I": 24}, {"approximate": "tanh"} if op == "geglu" else {})
    t = kernel_ops.SPECS[op].make_inputs(case, torch.bfloat16, CPU)
    out = kernel_ops.SPECS[op].eager(**t, **case.params)
    fwd, bwd = kernel_ops.SPECS[op].bytes_moved(case, 2)
    assert fwd == _nbytes(t["gate"], t["up"], out)
    assert bwd == _nbytes(out, t["gate"], t["up"], t["gate"], t["up"])


def test_cross_entropy_bytes_match_the_tensors_it_must_touch():
    case = kernel_cases.Case("cross_entropy", "t", {"T": 9, "V": 31}, {"softcap": None})
    t = kernel_ops.SPECS["cross_entropy"].make_inputs(case, torch.bfloat16, CPU)
    lse = torch.empty(9, dtype=torch.float32)
    fwd, bwd = kernel_ops.SPECS["cross_entropy"].bytes_moved(case, 2)
    assert fwd == _nbytes(t["logits"], t["target"], lse)
    assert bwd == _nbytes(t["logits"], lse, t["target"], t["logits"])  # ... -> dlogits


def test_flce_bytes_and_flops():
    case = kernel_cases.Case("fused_linear_cross_entropy", "t", {"T": 9, "H": 16, "V": 31}, {"softcap": None})
    t = kernel_ops.SPECS["fused_linear_cross_entropy"].make_inputs(case, torch.bfloat16, CPU)
    fwd, bwd = kernel_ops.SPECS["fused_linear_cross_entropy"].bytes_moved(case, 2)
    assert fwd == _nbytes(t["hidden"], t["weight"], t["target"])
    assert bwd == 2 * _nbytes(t["hidden"], t["weight"])  # read h, W; write dh, dW
    assert kernel_ops.SPECS["fused_linear_cross_entropy"].flops_full(case) == 3 * 2 * 9 * 16 * 31
    assert kernel_ops.SPECS["swiglu"].flops_full(_case("swiglu")) is None


# --------------------------------------------------------------------------- inputs and steps


def test_fresh_inputs_are_new_leaves_with_the_same_layout():
    master = kernel_ops.SPECS["rope"].make_inputs(_case("rope"), torch.bfloat16, CPU)
    assert not master["q"].is_contiguous(), "q must be HF's transposed (B, S, H, D) view"
    fresh = device_timing.fresh_inputs(master)
    for name, t in master.items():
        assert fresh[name].is_leaf and fresh[name].requires_grad == t.requires_grad
        assert fresh[name].stride() == t.stride() and fresh[name].data_ptr() != t.data_ptr()
        assert torch.equal(fresh[name], t)


def test_measure_gives_every_repeat_fresh_inputs_and_accumulates_no_grad():
    case = _case("rms_norm")
    master = kernel_ops.SPECS["rms_norm"].make_inputs(case, torch.float32, CPU)
    original = {k: v.detach().clone() for k, v in master.items()}
    seen_x = []

    def clobbering_call(x, weight):  # writes into its input, as Liger's cross entropy does
        seen_x.append(x.detach().clone())
        with torch.no_grad():
            x.mul_(2.0)
        return kernel_ops._eager_rms_norm(x, weight, 1e-6, 0.0, "llama")

    m = device_timing.measure(clobbering_call, master, CPU, kernel_run.SMOKE_SETTINGS, lambda: None, FakeTimer)
    assert all(torch.equal(x, original["x"]) for x in seen_x), "a repeat saw a previous repeat's writes"
    assert all(torch.equal(master[k], original[k]) for k in master)
    assert master["x"].grad is None and master["weight"].grad is None
    assert m.repeats == 3 and len(m.full_ms) == len(m.bwd_ms) == 3
    assert len(seen_x) == m.warmup_steps + 2 * m.repeats


def test_measure_never_keeps_a_graph_for_a_second_backward(monkeypatch):
    seen = []
    real_grad = torch.autograd.grad

    def spying_grad(outputs, inputs, *args, **kwargs):
        seen.append((kwargs.get("retain_graph"), kwargs.get("create_graph")))
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spying_grad)
    case = _case("swiglu")
    master = kernel_ops.SPECS["swiglu"].make_inputs(case, torch.float32, CPU)
    m = device_timing.measure(
        _resolve("eager", case, torch.float32), master, CPU, kernel_run.SMOKE_SETTINGS, lambda: None, FakeTimer
    )
    assert len(seen) == m.warmup_steps + 2 * m.repeats
    assert set(seen) == {(None, None)}


def test_repeats_are_clamped_by_the_settings():
    s = device_timing.Settings(loop_ms=100.0, min_repeats=5, max_repeats=50)
    assert device_timing._repeats_for(1.0, s) == 50
    assert device_timing._repeats_for(10.0, s) == 10
    assert device_timing._repeats_for(1000.0, s) == 5


# --------------------------------------------------------------------------- rows


def test_ok_row_statistics_and_bandwidth_from_a_fake_timer():
    case = _case("swiglu")
    master = kernel_ops.SPECS["swiglu"].make_inputs(case, torch.bfloat16, CPU)
    row = kernel_run.run_impl(case, "eager", "bfloat16", master, _context(copy_gbps=2.0))
    assert row["status"] == "ok", row["error"]
    assert row["full_times_ms"] == [1.0, 2.0, 3.0]  # FakeTimer's scripted steps
    assert row["full_ms"] == 2.0 and row["full_ms_p10"] == pytest.approx(1.2) and row["full_ms_p90"] == 2.8
    assert row["fwd_ms"] == 0.5 and row["bwd_ms"] == 1.5
    n_i = case.tokens * case.dims["I"]
    assert row["bytes_full"] == 8 * n_i * 2
    assert row["gbps_full"] == pytest.approx(row["bytes_full"] / 2e-3 / 1e9)
    assert row["frac_of_copy"] == pytest.approx(row["gbps_full"] / 2.0)
    assert row["gbps_fwd"] == pytest.approx(row["bytes_fwd"] / 0.5e-3 / 1e9)
    assert row["loss_in_forward"] is False and row["timer"] == "host_clock"
    assert row["point_key"] == f"swiglu/eager/bfloat16/{case.shape}"


def test_fused_loss_rows_are_flagged_and_get_no_split_bandwidth(monkeypatch):
    case = _case("cross_entropy")
    master = kernel_ops.SPECS["cross_entropy"].make_inputs(case, torch.float32, CPU)
    eager = kernel_impls._eager_call(kernel_ops.SPECS["cross_entropy"], case, torch.float32)
    monkeypatch.setattr("optkit.bench.kernels.impls._optkit_call", lambda spec, case, dtype: eager)
    row = kernel_run.run_impl(case, "optkit", "float32", master, _context())
    assert row["status"] == "ok" and row["loss_in_forward"] is True
    assert row["gbps_fwd"] is None and row["gbps_bwd"] is None and row["gbps_full"] > 0
    eager_row = kernel_run.run_impl(case, "eager", "float32", master, _context())
    assert eager_row["loss_in_forward"] is False


def test_flce_rows_carry_tflops():
    case = _case("fused_linear_cross_entropy")
    master = kernel_ops.SPECS[case.op].make_inputs(case, torch.float32, CPU)
    row = kernel_run.run_impl(case, "eager", "float32", master, _context())
    flops = 6 * case.tokens * case.dims["H"] * case.dims["V"]
    assert row["flops_full"] == flops and row["tflops_full"] == pytest.approx(flops / 2e-3 / 1e12)
    assert "TFLOP/s" in kernel_table.format_table([row])


@pytest.mark.parametrize(
    "exc, status",
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB"), "oom"),
        (RuntimeError("triton: out of resource: shared memory"), "error"),
    ],
)
def test_a_failing_impl_is_a_row_not_a_crash(monkeypatch, exc, status):
    def broken(**tensors):
        raise exc

    monkeypatch.setattr(kernel_run, "resolve_impl", lambda *a: broken)
    case = _case("rms_norm")
    master = kernel_ops.SPECS["rms_norm"].make_inputs(case, torch.float32, CPU)
    row = kernel_run.run_impl(case, "optkit", "float32", master, _context())
    assert row["status"] == status and str(exc) in row["error"] and row["full_ms"] is None


def test_missing_optkit_kernel_is_skipped_with_its_name(monkeypatch):
    spec = kernel_ops.SPECS["swiglu"]
    monkeypatch.setitem(kernel_ops.SPECS, "swiglu", kernel_ops.OpSpec(**{**spec.__dict__, "optkit_fn": "no_such_fn"}))
    case = _case("swiglu")
    master = kernel_ops.SPECS["swiglu"].make_inputs(case, torch.float32, CPU)
    row = kernel_run.run_impl(case, "optkit", "float32", master, _context())
    assert row["status"] == "skipped" and "optkit.kernels.swiglu.no_such_fn" in row["error"]


def test_liger_not_installed_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", None)  # import -> ImportError
    with pytest.raises(kernel_impls.ImplUnavailable, match="pip install liger-kernel"):
        kernel_impls._liger_call(kernel_ops.SPECS["swiglu"], _case("swiglu"), torch.device("cuda"))
    with pytest.raises(kernel_impls.ImplUnavailable, match="CUDA only"):
        kernel_impls._liger_call(kernel_ops.SPECS["swiglu"], _case("swiglu"), CPU)


def test_liger_calls_map_our_inputs_to_its_functional_api(monkeypatch):
    calls = {}

    def recorder(name):
        def fn(*args, **kwargs):
            calls[name] = (args, kwargs)
            return args[0]

        return fn

    fake = types.ModuleType("liger_kernel.transformers.functional")
    liger_ops = [spec.name for spec in kernel_ops.SPECS.values() if spec.liger_fn]
    for op in liger_ops:
        setattr(fake, kernel_ops.SPECS[op].liger_fn, recorder(op))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", fake)
    cuda = torch.device("cuda")  # resolving needs no GPU; the fakes run on CPU tensors
    for op in liger_ops:
        case = _case(op)
        inputs = kernel_ops.SPECS[op].make_inputs(case, torch.float32, CPU)
        kernel_impls._liger_call(kernel_ops.SPECS[op], case, cuda)(**inputs)
    args, kwargs = calls["rms_norm"]
    assert args[2] == 1e-6 and kwargs == {"offset": 0.0, "casting_mode": "llama"}
    args, _ = calls["rope"]
    assert args[2].dim() == 3 and args[2].shape[0] == 1, "Liger wants cos as (1, S, D)"
    for op in ("cross_entropy", "fused_linear_cross_entropy"):
        args, kwargs = calls[op]
        assert args[-1].dtype == torch.int64 and kwargs["ignore_index"] == -100 and kwargs["reduction"] == "mean"
    assert len(calls["fused_linear_cross_entropy"][0]) == 3  # hidden, weight, target


def test_liger_geglu_without_tanh_is_skipped(monkeypatch):
    fake = types.ModuleType("liger_kernel.transformers.functional")
    fake.liger_geglu = lambda a, b: a
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", fake)
    case = kernel_cases.Case("geglu", "t", {"T": 4, "I": 8}, {"approximate": "none"})
    with pytest.raises(kernel_impls.ImplUnavailable, match="tanh"):
        kernel_impls._liger_call(kernel_ops.SPECS["geglu"], case, torch.device("cuda"))


def test_compile_compiles_once_per_shape_across_token_counts():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cache = kernel_impls.CompileCache(backend=counting_backend)
    spec = kernel_ops.SPECS["rms_norm"]
    params = {"eps": 1e-6, "offset": 0.0, "cast_mode": "llama"}
    for tokens in (16, 24, 40):
        case = kernel_cases.Case("rms_norm", "t", {"T": tokens, "H": 32}, params)
        inputs = spec.make_inputs(case, torch.float32, CPU)
        out = cache.call_for(spec, case, torch.float32)(**inputs)
        torch.testing.assert_close(out, kernel_ops._eager_rms_norm(inputs["x"], inputs["weight"], **params))
    assert len(graphs) == 1, "a token sweep must reuse one compiled graph"
    other = kernel_cases.Case("rms_norm", "t", {"T": 16, "H": 48}, params)
    cache.call_for(spec, other, torch.float32)(**spec.make_inputs(other, torch.float32, CPU))
    assert len(graphs) == 2
    torch._dynamo.reset()


def test_rows_written_have_the_schema_and_parse(tmp_path):
    rows = kernel_run.run_suite(
        tmp_path,
        run_id="r1",
        cpu_smoke=True,
        ops=("swiglu", "rope"),
        impls=("eager", "compile", "liger"),
        env=FAKE_ENV,
        timer_factory=FakeTimer,
        log=lambda m: None,
    )
    written = read_rows(tmp_path / "results.jsonl")
    assert written == json.loads(json.dumps(rows)) and len(rows) == 6
    assert json.loads((tmp_path / "env.json").read_text())["git_sha"] == "abc"
    for row in written:
        assert set(row) == set(kernel_rows.KERNEL_ROW_FIELDS) and set(REQUIRED_FIELDS) <= set(row)
        assert (row["suite"], row["kind"], row["run_id"]) == ("kernels", "kernel", "r1")
        assert row["status"] in ("ok", "oom", "error", "skipped") and row["timestamp"]
        assert row["point_key"] == f"{row['op']}/{row['impl']}/{row['dtype']}/{row['shape']}"
    by_impl = {(r["op"], r["impl"]): r for r in written}
    assert by_impl[("swiglu", "eager")]["status"] == "ok"
    assert by_impl[("swiglu", "compile")]["status"] == "skipped"
    assert by_impl[("rope", "liger")]["error"] == "Liger-Kernel runs on CUDA only"
    table = kernel_table.format_table(written)
    assert "swiglu" in table and "1.00" in table and "skipped" in table


def test_run_without_cuda_gives_skipped_rows_for_the_whole_sweep(tmp_path, monkeypatch):
    from optkit.config.compose import compose

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("optkit.measure.env.capture_env", lambda: FAKE_ENV)
    cfg = compose(["suite=kernels"])
    assert cfg.suite.requires_cuda is True
    rows = kernel_run.run(cfg, tmp_path / "run7")
    cases = kernel_cases.sweep_cases()
    nf4_cases = sum(c.op == kernel_cases.NF4 for c in cases)  # + bitsandbytes; the chunk sweep: one FLCE shape
    rope_cases = sum(c.op == "rope" for c in cases)  # + optkit-inplace
    expected = len(cases) * len(kernel_impls.IMPLS) + nf4_cases + len(kernel_impls.CHUNK_IMPLS) + rope_cases
    assert len(rows) == expected
    assert {r["status"] for r in rows} == {"skipped"} and rows[0]["error"] == kernel_rows.NO_CUDA_REASON
    assert {r["run_id"] for r in rows} == {"run7"}
    assert "gradient computed in forward" not in kernel_table.format_table(rows)  # the note is about ok rows


def test_cpu_smoke_times_optkit_kernels_with_the_host_clock(tmp_path):
    """The plumbing end to end on real (interpreted) optkit kernels and the real timer."""
    rows = kernel_run.run_suite(
        tmp_path,
        cpu_smoke=True,
        ops=("rms_norm", "swiglu"),
        impls=("optkit", "eager"),
        env=FAKE_ENV,
        log=lambda m: None,
    )
    assert [(r["op"], r["impl"], r["status"]) for r in rows] == [
        ("rms_norm", "optkit", "ok"),
        ("rms_norm", "eager", "ok"),
        ("swiglu", "optkit", "ok"),
        ("swiglu", "eager", "ok"),
    ]
    for row in rows:
        assert row["full_ms"] > 0 and len(row["full_times_ms"]) == row["repeats"] and row["copy_gbps"] > 0
        assert row["full_device_ms"] is None and row["device_error"] == kernel_rows.NO_DEVICE_TIME_REASON


# --------------------------------------------------------------------------- FLCE chunk sweep


def test_chunk_impls_apply_to_flce_only_and_pass_chunk_rows(monkeypatch):
    seen = {}

    def fake_flce(**kwargs):
        seen.update(kwargs)
        return kwargs["hidden"].sum()

    module = types.ModuleType("optkit.kernels.fused_linear_cross_entropy")
    module.fused_linear_cross_entropy = fake_flce
    monkeypatch.setitem(sys.modules, "optkit.kernels.fused_linear_cross_entropy", module)
    flce = _case(kernel_cases.FLCE)
    inputs = kernel_ops.SPECS[kernel_cases.FLCE].make_inputs(flce, torch.float32, CPU)
    cache = kernel_impls.CompileCache("unused")
    for impl, rows in kernel_impls.CHUNK_IMPLS.items():
        _resolve(impl, flce, torch.float32, cache)(**inputs)
        assert seen["chunk_rows"] == rows
    seen.clear()
    _resolve("optkit", flce, torch.float32, cache)(**inputs)
    assert "chunk_rows" not in seen, "plain optkit keeps the kernel's own default"
    with pytest.raises(kernel_impls.ImplUnavailable, match=f"of {kernel_cases.FLCE} only"):
        _resolve("optkit-c256", _case("swiglu"), torch.float32, cache)
    assert kernel_impls.impls_for("swiglu", kernel_impls.ALL_IMPLS) == list(kernel_impls.IMPLS)
    flce_impls = kernel_impls.impls_for(kernel_cases.FLCE, kernel_impls.ALL_IMPLS)
    assert flce_impls == [*kernel_impls.IMPLS, *kernel_impls.CHUNK_IMPLS]


def test_chunk_rows_say_what_they_are():
    context = _context()
    row = kernel_rows.base_row(_case(kernel_cases.FLCE), "optkit-c512", "bfloat16", context)
    assert row["params"]["chunk_rows"] == 512 and row["loss_in_forward"] is True
    assert row["impl_version"] == "abc" and row["point_key"].startswith(f"{kernel_cases.FLCE}/optkit-c512/")
    assert "chunk_rows" not in kernel_rows.base_row(_case(kernel_cases.FLCE), "optkit", "bfloat16", context)["params"]


def test_rope_inplace_impl_times_the_in_place_kernel_on_fresh_inputs(tmp_path):
    """rope's optkit-inplace row: the suite's leaves are written over each repeat (fresh copies keep that from
    the next repeat) and its gradients are the out-of-place op's."""
    assert kernel_impls.impls_for("rope", kernel_impls.ALL_IMPLS) == [*kernel_impls.IMPLS, kernel_impls.ROPE_INPLACE]
    assert kernel_impls.ROPE_INPLACE not in kernel_impls.impls_for("swiglu", kernel_impls.ALL_IMPLS)
    case = _case("rope")
    master = kernel_ops.SPECS["rope"].make_inputs(case, torch.float32, CPU)
    inputs = device_timing.fresh_inputs(master)
    out = _resolve(kernel_impls.ROPE_INPLACE, case, torch.float32)(**inputs)
    assert out[0].data_ptr() == inputs["q"].data_ptr(), "the in-place impl must write over q"
    expected = _resolve("optkit", case, torch.float32)(**device_timing.fresh_inputs(master))
    assert all(torch.allclose(a, b) for a, b in zip(out, expected))
    rows = kernel_run.run_suite(
        tmp_path, cpu_smoke=True, ops=("rope",), impls=("optkit-inplace",), env=FAKE_ENV, log=lambda m: None
    )
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["impl"] == "optkit-inplace", rows[0]["error"]


# --------------------------------------------------------------------------- device time: trace parsing

E = device_trace.TraceEvent


def _region(impl, phase, i, start, end):
    return E(device_trace.region_name(impl, phase, i), False, start, end, "user_annotation")


def test_busy_time_counts_overlapping_work_once():
    assert intervals.busy_ms([]) == 0.0
    assert intervals.busy_ms([(0.0, 10.0), (10.0, 30.0)]) == pytest.approx(0.030)  # back to back: the sum
    assert intervals.busy_ms([(20.0, 30.0), (0.0, 10.0), (5.0, 15.0), (6.0, 7.0)]) == pytest.approx(0.025)


def test_device_work_is_attributed_to_the_region_it_starts_in():
    name0 = device_trace.region_name("optkit", "full", 0)
    events = [
        _region("optkit", "full", 0, 100.0, 200.0),
        _region("optkit", "full", 1, 300.0, 400.0),
        E("flush: vectorized_elementwise_kernel<FillFunctor>", True, 40.0, 95.0, "kernel"),  # before: excluded
        E("rms_norm_fwd", True, 110.0, 130.0, "kernel"),
        E("rms_norm_bwd", True, 140.0, 150.0, "kernel"),
        E("Memcpy DtoD (Device -> Device)", True, 160.0, 170.0, "gpu_memcpy"),
        E(name0, True, 105.0, 175.0, "gpu_user_annotation"),  # the marker's device copy
        E("Context Sync", True, 176.0, 177.0, "cuda_sync"),
        E("aten::mul", False, 101.0, 120.0, "cpu_op"),  # host ops are not device work
        E("corrupted head record", True, -1e14, -1e14 + 5.0, "kernel"),  # foreign clock: in no region
        E("skewed flush tail", True, 99.0, 101.0, "kernel"),  # started before the region: not its work
        E("stream A", True, 310.0, 330.0, "kernel"),
        E("stream B", True, 320.0, 340.0, "kernel"),  # overlaps A: counted once
        E("Memset (Device)", True, 350.0, 351.0, "gpu_memset"),
        E("next setup copy", True, 401.0, 420.0, "kernel"),  # after the region: excluded
        E("older torch: no activity type", True, 360.0, 362.0, None),
    ]
    regions = device_trace.device_time_by_region(events)
    assert regions[name0] == (pytest.approx(0.040), 3)
    assert regions[device_trace.region_name("optkit", "full", 1)] == (pytest.approx(0.033), 4)
    assert set(regions) == {name0, device_trace.region_name("optkit", "full", 1)}


def test_device_times_need_every_region_and_some_work_in_each():
    events, t = [], 0.0
    for phase, kernel_us in (("full", 40.0), ("fwd", 10.0), ("bwd", 30.0)):
        for i in range(2):
            events += [_region("eager", phase, i, t, t + 100.0), E("k", True, t + 10.0, t + 10.0 + kernel_us, "kernel")]
            t += 200.0
    times = device_trace.device_times(device_trace.device_time_by_region(events), "eager", repeats=2)
    assert times.full_ms == [pytest.approx(0.040)] * 2 and times.fwd_ms == [pytest.approx(0.010)] * 2
    assert times.bwd_ms == [pytest.approx(0.030)] * 2 and times.full_events == [1, 1] and not times.uneven_phases
    extra = events + [E("one more kernel", True, 210.0, 215.0, "kernel")]  # in full/1 only
    assert device_trace.device_times(device_trace.device_time_by_region(extra), "eager", repeats=2).uneven_phases == [
        "full"
    ]
    with pytest.raises(device_trace.DeviceTraceError, match="lacks 1 of eager's 3 full regions"):
        device_trace.device_times(device_trace.device_time_by_region(events), "eager", repeats=3)
    emptied = [e for e in events if not (e.on_device and e.start_us == 10.0)]  # full/0 lost its kernel
    with pytest.raises(device_trace.DeviceTraceError, match="lost"):
        device_trace.device_times(device_trace.device_time_by_region(emptied), "eager", repeats=2)


def test_trace_events_read_torch_function_events():
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    marker = FunctionEvent(id=1, name=device_trace.region_name("liger", "bwd", 0), thread=0, start_us=1.0, end_us=9.0)
    kernel = FunctionEvent(
        id=2, name="triton_red_fused", thread=0, start_us=2.0, end_us=5.5, device_type=DeviceType.CUDA
    )
    host_op = FunctionEvent(id=3, name="aten::add", thread=0, start_us=2.0, end_us=3.0)
    kernel.activity_type = "kernel"  # torch 2.13 sets it; older FunctionEvents lack it (read as None)
    got = device_trace.trace_events([marker, kernel, host_op])
    assert [(e.name, e.on_device, e.start_us, e.end_us) for e in got] == [
        (marker.name, False, 1.0, 9.0),
        ("triton_red_fused", True, 2.0, 5.5),
    ]
    assert got[1].kind == "kernel" and device_trace.is_device_work(got[1]) and not device_trace.is_device_work(got[0])


def test_profiler_trace_returns_its_region_markers(recwarn):
    """The real torch.profiler session (CPU build: no device events) keeps the markers' names."""
    with device_trace.ProfilerTrace() as trace:
        with trace.region(device_trace.region_name("eager", "fwd", 0)):
            torch.ones(3).add_(1)
    markers = [e for e in trace.events() if not e.on_device]
    assert [e.name for e in markers] == [device_trace.region_name("eager", "fwd", 0)]
    assert markers[0].end_us > markers[0].start_us


# --------------------------------------------------------------------------- device time: the pass


class FakeTrace:
    """ProfilerTrace's interface with a scripted trace. Every region holds device work by phase (full:
    kernels of 0.1 and 0.3 ms; fwd: 0.1 ms; bwd: 0.3 ms; the pad: PAD_LAUNCHES launches) and what a real
    trace adds around it: an L2-flush kernel just before, the marker's device copy, a host op. The first
    ``lost_head`` device records of the session get a timestamp from another clock (pytorch#192021)."""

    WORK_US = {"full": (100.0, 300.0), "fwd": (100.0,), "bwd": (300.0,)}

    def __init__(self, order=None, lost_head=0):
        self.order, self.lost_head = order if order is not None else [], lost_head
        self.clock, self.trace = 0.0, []

    def __enter__(self):
        self.order.append("trace")
        return self

    def __exit__(self, *exc):
        pass

    @contextlib.contextmanager
    def region(self, name):
        self.trace.append(E("flush", True, self.clock + 1.0, self.clock + 40.0, "kernel"))
        start = self.clock = self.clock + 50.0
        yield
        phase = name.split("/")[-2] if name != device_trace.PAD_REGION else "pad"
        work = self.WORK_US.get(phase, (1.0,) * device_trace.PAD_LAUNCHES)
        t = start + 5.0
        for us in work:
            self.trace.append(E(f"{phase}_kernel", True, t, t + us, "kernel"))
            t += us + 2.0
        self.trace += [
            E(name, True, start + 4.0, t, "gpu_user_annotation"),
            E("aten::mul", False, start + 1.0, t, "cpu_op"),
            E(name, False, start, t + 10.0, "user_annotation"),
        ]
        self.clock = t + 10.0

    def events(self):
        device = sorted((e for e in self.trace if e.on_device and e.kind == "kernel"), key=lambda e: e.start_us)
        lost = set(map(id, device[: self.lost_head]))
        return [E(e.name, True, e.start_us - 1e14, e.end_us - 1e14, e.kind) if id(e) in lost else e for e in self.trace]


class OrderedTimer(FakeTimer):
    order = None

    def begin_step(self):
        self.order.append("event")


def _flags(rows):
    """The flags after "ok" on each ok row's line of the table (FakeTimer's rows are all noisy)."""
    return [line.split("  ok", 1)[1].strip() for line in kernel_table.format_table(rows).splitlines() if "  ok" in line]


def _smoke_with_trace(tmp_path, trace_factory, **kwargs):
    return kernel_run.run_suite(
        tmp_path,
        run_id="d",
        cpu_smoke=True,
        ops=("swiglu",),
        impls=("eager",),
        env=FAKE_ENV,
        timer_factory=FakeTimer,
        trace_factory=trace_factory,
        log=lambda m: None,
        **kwargs,
    )


def test_device_pass_fills_rows_after_every_event_timed_row(tmp_path):
    order = []
    OrderedTimer.order = order
    (tmp_path / "results.jsonl").write_text('{"run_id": "earlier"}\n')  # another run's row stays
    rows = kernel_run.run_suite(
        tmp_path,
        run_id="d",
        cpu_smoke=True,
        ops=("swiglu", "rms_norm"),
        impls=("eager",),
        env=FAKE_ENV,
        timer_factory=OrderedTimer,
        trace_factory=lambda: FakeTrace(order),
        log=lambda m: None,
    )
    assert "trace" in order and "event" not in order[order.index("trace") :], "a profiler session preceded timing"
    assert order.count("trace") == 2, "one session per case"
    for row in rows:
        assert row["status"] == "ok" and row["device_error"] is None
        assert row["full_device_ms"] == pytest.approx(0.4) and row["fwd_device_ms"] == pytest.approx(0.1)
        assert row["bwd_device_ms"] == pytest.approx(0.3) and row["n_kernels_full"] == 2
        assert row["device_repeats"] == kernel_run.SMOKE_SETTINGS.device_repeats == len(row["full_device_times_ms"])
        assert row["gbps_device"] == pytest.approx(row["bytes_full"] / 0.4e-3 / 1e9)
        assert row["frac_of_copy_device"] == pytest.approx(row["gbps_device"] / row["copy_gbps"])
        assert row["full_ms"] == 2.0, "the event time is FakeTimer's, untouched by the device pass"
    written = read_rows(tmp_path / "results.jsonl")
    assert written[0] == {"run_id": "earlier"} and written[1:] == json.loads(json.dumps(rows))
    table = kernel_table.format_table(rows)
    assert "dev ms" in table and "0.400" in table and _flags(rows) == ["noisy", "noisy"]
    assert _flags([dict(rows[0], full_device_ms=2.5)]) == ["noisy DEVICE>EVENTS"], "kernels outlasting events"


def test_a_killed_device_pass_leaves_event_rows_that_say_so(tmp_path):
    class Killed(BaseException):
        pass

    def killed_trace():
        raise Killed()

    with pytest.raises(Killed):
        _smoke_with_trace(tmp_path, killed_trace)
    (row,) = read_rows(tmp_path / "results.jsonl")
    assert row["status"] == "ok" and row["full_ms"] == 2.0
    assert row["full_device_ms"] is None and row["device_error"] == kernel_rows.DEVICE_PENDING_REASON


def test_lost_head_records_are_absorbed_by_the_pad(tmp_path):
    (row,) = _smoke_with_trace(tmp_path, lambda: FakeTrace(lost_head=device_trace.PAD_LAUNCHES - 1))
    assert row["full_device_ms"] == pytest.approx(0.4) and row["device_error"] is None


def test_a_session_that_lost_its_whole_pad_is_traced_again(tmp_path):
    sessions = iter([FakeTrace(lost_head=device_trace.PAD_LAUNCHES + 1), FakeTrace()])
    (row,) = _smoke_with_trace(tmp_path, lambda: next(sessions))
    assert row["full_device_ms"] == pytest.approx(0.4) and row["device_error"] is None


def test_two_sessions_that_lost_their_whole_pad_give_no_device_time(tmp_path):
    (row,) = _smoke_with_trace(tmp_path, lambda: FakeTrace(lost_head=device_trace.PAD_LAUNCHES + 1))
    assert row["status"] == "ok" and row["full_device_ms"] is None and "pytorch#192021" in row["device_error"]
    assert _flags([row]) == ["noisy NO-DEVICE-TIME"]


def test_device_pass_off_or_without_cuda(tmp_path):
    (row,) = _smoke_with_trace(tmp_path / "off", lambda: FakeTrace(), device_repeats=0)
    assert row["full_device_ms"] is None and row["device_error"] == kernel_rows.DEVICE_OFF_REASON
    (row,) = _smoke_with_trace(tmp_path / "cpu", None)
    assert row["full_device_ms"] is None and row["device_error"] == kernel_rows.NO_DEVICE_TIME_REASON
    assert _flags([row]) == ["noisy"], "an expected absence is not flagged"


def test_an_impl_failing_in_the_device_pass_is_noted_on_its_row_only(monkeypatch):
    case = _case("swiglu")
    context = _context()
    context.trace_factory = FakeTrace
    rows = [kernel_rows.base_row(case, impl, "float32", context) for impl in ("eager", "liger")]
    eager = kernel_impls._eager_call(kernel_ops.SPECS["swiglu"], case, torch.float32)

    def broken(**tensors):
        raise RuntimeError("boom in the device pass")

    monkeypatch.setattr(device_pass, "resolve_impl", lambda impl, *a: eager if impl == "eager" else broken)
    device_pass.measure_device_case(case, "float32", rows, context, log=lambda m: None)
    assert rows[0]["full_device_ms"] == pytest.approx(0.4) and rows[0]["device_error"] is None
    assert rows[1]["full_device_ms"] is None and "boom in the device pass" in rows[1]["device_error"]


# --------------------------------------------------------------------------- nf4_dequantize: a forward-only op

NF4 = kernel_cases.NF4
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


def _nf4_case(out_features, in_features):
    return kernel_cases.Case(
        NF4, "t", {"O": out_features, "I": in_features}, {"blocksize": 64, "nested_blocksize": 256}
    )


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def test_nf4_cases_are_llama3_8b_linear_weights():
    cases = kernel_cases.sweep_cases(ops=(NF4,))
    # q/o, k/v, gate/up, down of conf/model/llama3_8b.yaml, each shape once
    assert [(c.dims["O"], c.dims["I"]) for c in cases] == [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
    assert {c.model for c in cases} == {"llama3_8b"} and all(c.tokens is None for c in cases)
    assert all(c.params == {"blocksize": 64, "nested_blocksize": 256} for c in cases)
    assert [c.shape for c in kernel_cases.sweep_cases(quick=True, ops=(NF4,))] == ["O4096xI4096"]
    spec = kernel_ops.SPECS[NF4]
    assert spec.forward_only and set(spec.not_applicable) == {"compile", "liger"}
    assert kernel_impls.impls_for(NF4, kernel_impls.ALL_IMPLS) == [*kernel_impls.IMPLS, kernel_impls.BITSANDBYTES]
    assert kernel_impls.BITSANDBYTES not in kernel_impls.impls_for("swiglu", kernel_impls.ALL_IMPLS)


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nf4_bytes_match_the_tensors_it_must_touch(dtype):
    case = _nf4_case(256, 128)  # 512 absmax blocks: two nested blocks of 256
    t = kernel_ops.SPECS[NF4].make_inputs(case, dtype, CPU)
    assert t["weight_packed"].dtype == torch.uint8 and t["absmax"].dtype == torch.uint8
    assert t["nested_absmax"].numel() == 2
    out = _resolve("eager", case, dtype)(**t)
    fwd, bwd = kernel_ops.SPECS[NF4].bytes_moved(case, dtype.itemsize)
    assert fwd == _nbytes(*t.values(), out)  # packed codes, absmax codes, nested scales, code tables, offset -> W
    assert bwd is None


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nf4_optkit_equals_the_reference_on_the_suites_inputs(dtype):
    """Bit for bit: the reference is the source of truth. bitsandbytes' CPU dequantize_4bit agrees at the
    smoke shapes (it does not at every shape: smoke_cases picks these for it)."""
    for case in kernel_cases.smoke_cases((NF4,)) + [_nf4_case(256, 128)]:
        torch.manual_seed(0)
        master = kernel_ops.SPECS[NF4].make_inputs(case, dtype, CPU)
        expected = _resolve("eager", case, dtype)(**device_timing.fresh_inputs(master))
        assert expected.shape == (case.dims["O"], case.dims["I"]) and expected.dtype == dtype
        for impl in ("optkit", "bitsandbytes"):
            got = _resolve(impl, case, dtype)(**device_timing.fresh_inputs(master))
            assert torch.equal(_bits(got), _bits(expected)), f"{impl} at {case.shape} differs from the reference"


def test_nf4_compile_and_liger_are_skipped_with_the_reason():
    case = _nf4_case(64, 64)
    context = _context(compile_cache=kernel_impls.CompileCache(None))  # compile enabled: the op's own reason
    for impl in ("compile", "liger"):
        row = kernel_run.run_impl(case, impl, "bfloat16", {}, context)
        assert row["status"] == "skipped" and row["error"] == kernel_ops.NF4_NOT_APPLICABLE[impl]
    assert "bitsandbytes" in kernel_ops.NF4_NOT_APPLICABLE["compile"]
    assert "no NF4 dequantize" in kernel_ops.NF4_NOT_APPLICABLE["liger"]


@needs_bnb
def test_forward_only_rows_time_the_forward_and_have_no_backward():
    case = _nf4_case(64, 64)
    master = kernel_ops.SPECS[NF4].make_inputs(case, torch.bfloat16, CPU)
    row = kernel_run.run_impl(case, "eager", "bfloat16", master, _context(copy_gbps=2.0))
    assert row["status"] == "ok" and row["forward_only"] is True and row["loss_in_forward"] is False
    assert row["full_times_ms"] == row["fwd_times_ms"] == [1.0, 2.0, 3.0]  # FakeTimer's steps: one loop, forwards
    assert row["full_ms"] == row["fwd_ms"] == 2.0 and row["repeats"] == 3
    assert row["bwd_ms"] is None and row["bwd_times_ms"] is None and row["bytes_bwd"] is None
    assert row["gbps_bwd"] is None and row["bytes_full"] == row["bytes_fwd"]
    assert row["gbps_full"] == pytest.approx(row["bytes_fwd"] / 2e-3 / 1e9) == row["gbps_fwd"]
    assert row["tokens"] is None and row["hidden"] == 64


@needs_bnb
def test_forward_only_measure_gives_every_repeat_fresh_inputs():
    case = _nf4_case(64, 64)
    master = kernel_ops.SPECS[NF4].make_inputs(case, torch.bfloat16, CPU)
    eager = _resolve("eager", case, torch.bfloat16)
    seen = []

    def recording_call(**tensors):
        seen.append(tensors["weight_packed"].data_ptr())
        return eager(**tensors)

    m = kernel_phases.measure_forward(recording_call, master, CPU, kernel_run.SMOKE_SETTINGS, lambda: None, FakeTimer)
    assert len(seen) == 1 + (m.warmup_steps - 1) + m.repeats  # first call, warm-up, timed forwards: no backward
    assert master["weight_packed"].data_ptr() not in seen and m.bwd_ms == []


@needs_bnb
def test_cpu_smoke_runs_nf4_dequantize(tmp_path):
    """The plumbing end to end: real (interpreted) optkit kernel, the reference, bitsandbytes' CPU path."""
    rows = kernel_run.run_suite(tmp_path, cpu_smoke=True, ops=(NF4,), env=FAKE_ENV, log=lambda m: None)
    cases = kernel_cases.smoke_cases((NF4,))
    assert [(r["shape"], r["impl"]) for r in rows] == [
        (c.shape, impl) for c in cases for impl in kernel_impls.impls_for(NF4, kernel_impls.ALL_IMPLS)
    ]
    for row in rows:
        ok = row["impl"] in ("optkit", "eager", "bitsandbytes")
        assert row["status"] == ("ok" if ok else "skipped"), row["error"]
        assert row["forward_only"] is True and row["bwd_ms"] is None
        if ok:
            assert row["full_ms"] > 0 and row["fwd_ms"] == row["full_ms"] and row["bytes_bwd"] is None
    assert {r["impl_version"] for r in rows if r["impl"] == "bitsandbytes"} == {None}  # FAKE_ENV has no version
    table = kernel_table.format_table(rows)
    assert "forward-only ops (nf4_dequantize)" in table and "bitsandbytes" in table


def test_missing_bitsandbytes_skips_the_case_with_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)  # import -> ImportError
    rows = kernel_run.run_suite(
        tmp_path,
        cpu_smoke=True,
        ops=(NF4,),
        impls=("optkit", "eager", "bitsandbytes"),
        env=FAKE_ENV,
        log=lambda m: None,
    )
    assert rows and {r["status"] for r in rows} == {"skipped"}
    assert all("pip install bitsandbytes" in r["error"] for r in rows)
    with pytest.raises(kernel_impls.ImplUnavailable, match="pip install bitsandbytes"):
        _resolve("bitsandbytes", _nf4_case(64, 64), torch.bfloat16)


@needs_bnb
def test_forward_only_device_pass_traces_the_forward_as_full(tmp_path):
    order = []
    rows = kernel_run.run_suite(
        tmp_path,
        run_id="d",
        cpu_smoke=True,
        ops=(NF4,),
        impls=("eager",),
        env=FAKE_ENV,
        timer_factory=FakeTimer,
        trace_factory=lambda: FakeTrace(order),
        log=lambda m: None,
    )
    for row in rows:
        assert row["status"] == "ok" and row["device_error"] is None
        assert row["full_device_ms"] == pytest.approx(0.4) == row["fwd_device_ms"]  # FakeTrace's "full" work
        assert row["bwd_device_ms"] is None and row["n_kernels_full"] == 2
        assert row["device_repeats"] == kernel_run.SMOKE_SETTINGS.device_repeats
    assert order.count("trace") == len(kernel_cases.smoke_cases((NF4,))), "one session per case"
    with pytest.raises(device_trace.DeviceTraceError, match="lacks 2 of eager's 2 forward regions"):
        kernel_phases.forward_device_times({}, "eager", 2)


# --------------------------------------------------------------------------- command line


def test_command_line_runs_a_standalone_subset_and_will_not_mix_runs(tmp_path, capsys):
    argv = [
        "--run-dir",
        str(tmp_path),
        "--cpu-smoke",
        "--ops",
        "swiglu",
        "--impls",
        "eager,liger",
        "--dtypes",
        "bfloat16,float32",
        "--device-repeats",
        "0",
    ]
    assert kernel_run.main(argv) == 0
    rows = read_rows(tmp_path / "results.jsonl")
    assert [(r["impl"], r["dtype"], r["status"]) for r in rows] == [
        ("eager", "bfloat16", "ok"),
        ("liger", "bfloat16", "skipped"),
        ("eager", "float32", "ok"),
        ("liger", "float32", "skipped"),
    ]
    assert "4 rows (2 ok, 2 skipped)" in capsys.readouterr().out
    assert kernel_run.main(argv) == 2, "a second run into the same directory would mix runs"
    assert len(read_rows(tmp_path / "results.jsonl")) == 4


# --------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
def test_device_pass_on_the_gpu_agrees_with_events_where_the_host_keeps_up(tmp_path):
    """SwiGLU at Llama/Qwen widths, 1024-16384 tokens. At 16384 tokens (~1 ms of kernels) the host
    keeps ahead, so event and device time agree within 10%; everywhere the kernels fit inside the
    event window; optkit's SwiGLU launches exactly its two kernels (so no flush, no input copy and
    no region marker was attributed to it)."""
    rows = kernel_run.run_suite(tmp_path, ops=("swiglu",), impls=("optkit", "eager"), env=FAKE_ENV, log=lambda m: None)
    assert rows and all(r["status"] == "ok" and r["device_error"] is None for r in rows), rows[0]["device_error"]
    for row in rows:
        assert 0 < row["full_device_ms"] <= 1.1 * row["full_ms"], row["point_key"]
        assert row["fwd_device_ms"] < row["full_device_ms"] and row["bwd_device_ms"] < row["full_device_ms"]
        if row["tokens"] == 16384:
            assert row["full_device_ms"] == pytest.approx(row["full_ms"], rel=0.1), row["point_key"]
        if row["impl"] == "optkit":
            assert row["n_kernels_full"] == 2, row["point_key"]
    assert read_rows(tmp_path / "results.jsonl") == json.loads(json.dumps(rows))
