"""CPU tests of the kernel benchmark harness (optkit/kernel_suite.py): the sweep, byte counts, rows,
implementation discovery, failure rows, fresh inputs per repeat, compile caching, and a tiny run.

Byte counts are checked against the nbytes of real tensors (inputs, outputs, gradients) rather
than against the formulas they test. Timing uses a fake timer wherever numbers are asserted.
"""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from optkit import kernel_suite as ks
from optkit.results import read_rows

CPU = torch.device("cpu")
# The fields the brief requires of every kernel row.
REQUIRED_FIELDS = (
    "schema_version run_id suite kind status error op impl dtype shape tokens hidden fwd_ms bwd_ms full_ms "
    "full_ms_p10 full_ms_p90 full_times_ms bytes_full gbps_full copy_gbps frac_of_copy peak_bytes "
    "peak_delta_bytes loss_in_forward gpu_name gpu_slug torch triton git_sha point_key timestamp"
).split()
FAKE_ENV = {"gpu_name": None, "torch_version": torch.__version__, "triton_version": "x", "git_sha": "abc",
            "git_dirty": False, "liger_kernel_version": None}


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
        return [{"forward_ms": 0.25 * (1 + i), "backward_ms": 0.75 * (1 + i), "step_ms": 1.0 + i}
                for i in range(self.steps)]


def _context(timer_factory=FakeTimer, settings=ks.SMOKE_SETTINGS, copy_gbps=100.0, compile_cache=None):
    return ks.RunContext(run_id="t", device=CPU, env=FAKE_ENV, env_fields=ks._env_fields(FAKE_ENV),
                         settings=settings, flush=ks.L2Flush(CPU), copy_gbps=copy_gbps,
                         compile_cache=compile_cache or ks.CompileCache("no compile in this test"),
                         timer_factory=timer_factory)


def _case(op):
    return next(c for c in ks.smoke_cases((op,)))


# --------------------------------------------------------------------------- the sweep


def test_sweep_covers_the_published_shapes_once():
    cases = ks.sweep_cases()
    shapes = [(c.op, c.shape) for c in cases]
    assert len(shapes) == len(set(shapes)), "a shape shared by two models must appear once"
    by_op = {op: [c for c in cases if c.op == op] for op in ks.OPS}
    assert {c.dims["H"] for c in by_op["rms_norm"]} == {4096, 3584}
    assert {c.tokens for c in by_op["rms_norm"]} == set(ks.TOKENS)
    assert {(c.dims["Hq"], c.dims["Hkv"], c.dims["D"]) for c in by_op["rope"]} == {(32, 8, 128), (16, 8, 256)}
    assert all(c.dims["B"] * c.dims["S"] == c.tokens for c in by_op["rope"])
    assert {c.dims["I"] for c in by_op["swiglu"]} == {14336, 12288}
    assert [c.params["approximate"] for c in by_op["geglu"]] == ["tanh"] * len(ks.TOKENS)
    assert {(c.dims["V"], c.params["softcap"]) for c in by_op["cross_entropy"]} == {
        (128256, None), (151936, None), (256000, 30.0)}
    assert {c.tokens for c in by_op["cross_entropy"]} == {4096, 8192}
    (flce,) = by_op["fused_linear_cross_entropy"]
    assert (flce.tokens, flce.dims["H"], flce.dims["V"]) == (8192, 4096, 128256)
    gemma_norm = next(c for c in by_op["rms_norm"] if c.dims["H"] == 3584)
    assert (gemma_norm.params["cast_mode"], gemma_norm.params["offset"]) == ("gemma", 1.0)


def test_quick_sweep_is_one_shape_per_op():
    cases = ks.sweep_cases(quick=True)
    assert sorted(c.op for c in cases) == sorted(ks.OPS)


def test_compile_group_ignores_only_token_dims():
    cases = [c for c in ks.sweep_cases() if c.op == "rope"]
    groups = {c.compile_group for c in cases}
    assert groups == {("rope", "Hq32xHkv8xD128"), ("rope", "Hq16xHkv8xD256")}
    ce = {c.compile_group for c in ks.sweep_cases(ops=("cross_entropy",))}
    assert ("cross_entropy", "V256000-softcap30") in ce and len(ce) == 3


def test_unknown_op_is_a_clear_error():
    with pytest.raises(ValueError, match="choose from"):
        ks.sweep_cases(ops=("rmsnorm",))


# --------------------------------------------------------------------------- byte counts


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_bytes_match_the_tensors_it_must_touch(dtype):
    case = ks.Case("rms_norm", "t", {"T": 7, "H": 40}, {"eps": 1e-6, "offset": 0.0, "cast_mode": "llama"})
    t = ks.SPECS["rms_norm"].make_inputs(case, dtype, CPU)
    y = ks._eager_rms_norm(t["x"], t["weight"], 1e-6, 0.0, "llama")
    rstd = torch.empty(7, dtype=torch.float32)
    fwd, bwd = ks.SPECS["rms_norm"].bytes_moved(case, dtype.itemsize)
    assert fwd == _nbytes(t["x"], t["weight"], y, rstd)
    assert bwd == _nbytes(y, t["x"], t["weight"], rstd) + _nbytes(t["x"], t["weight"])  # dy,x,w,rstd -> dx,dw


def test_rope_bytes_match_the_tensors_it_must_touch():
    case = ks.Case("rope", "t", {"T": 12, "B": 2, "S": 6, "Hq": 4, "Hkv": 2, "D": 8})
    t = ks.SPECS["rope"].make_inputs(case, torch.bfloat16, CPU)
    q2, k2 = ks._eager_rope(t["q"], t["k"], t["cos"], t["sin"])
    fwd, bwd = ks.SPECS["rope"].bytes_moved(case, 2)
    assert fwd == _nbytes(t["q"], t["k"], t["cos"], t["sin"], q2, k2)
    assert bwd == fwd  # dq', dk', cos, sin -> dq, dk


@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_gated_bytes_match_the_tensors_it_must_touch(op):
    case = ks.Case(op, "t", {"T": 5, "I": 24}, {"approximate": "tanh"} if op == "geglu" else {})
    t = ks.SPECS[op].make_inputs(case, torch.bfloat16, CPU)
    out = ks.SPECS[op].eager(**t, **case.params)
    fwd, bwd = ks.SPECS[op].bytes_moved(case, 2)
    assert fwd == _nbytes(t["gate"], t["up"], out)
    assert bwd == _nbytes(out, t["gate"], t["up"], t["gate"], t["up"])


def test_cross_entropy_bytes_match_the_tensors_it_must_touch():
    case = ks.Case("cross_entropy", "t", {"T": 9, "V": 31}, {"softcap": None})
    t = ks.SPECS["cross_entropy"].make_inputs(case, torch.bfloat16, CPU)
    lse = torch.empty(9, dtype=torch.float32)
    fwd, bwd = ks.SPECS["cross_entropy"].bytes_moved(case, 2)
    assert fwd == _nbytes(t["logits"], t["target"], lse)
    assert bwd == _nbytes(t["logits"], lse, t["target"], t["logits"])  # ... -> dlogits


def test_flce_bytes_and_flops():
    case = ks.Case("fused_linear_cross_entropy", "t", {"T": 9, "H": 16, "V": 31}, {"softcap": None})
    t = ks.SPECS["fused_linear_cross_entropy"].make_inputs(case, torch.bfloat16, CPU)
    fwd, bwd = ks.SPECS["fused_linear_cross_entropy"].bytes_moved(case, 2)
    assert fwd == _nbytes(t["hidden"], t["weight"], t["target"])
    assert bwd == 2 * _nbytes(t["hidden"], t["weight"])  # read h, W; write dh, dW
    assert ks.SPECS["fused_linear_cross_entropy"].flops_full(case) == 3 * 2 * 9 * 16 * 31
    assert ks.SPECS["swiglu"].flops_full(_case("swiglu")) is None


# --------------------------------------------------------------------------- inputs and steps


def test_fresh_inputs_are_new_leaves_with_the_same_layout():
    master = ks.SPECS["rope"].make_inputs(_case("rope"), torch.bfloat16, CPU)
    assert not master["q"].is_contiguous(), "q must be HF's transposed (B, S, H, D) view"
    fresh = ks.fresh_inputs(master)
    for name, t in master.items():
        assert fresh[name].is_leaf and fresh[name].requires_grad == t.requires_grad
        assert fresh[name].stride() == t.stride() and fresh[name].data_ptr() != t.data_ptr()
        assert torch.equal(fresh[name], t)


def test_measure_gives_every_repeat_fresh_inputs_and_accumulates_no_grad():
    case = _case("rms_norm")
    master = ks.SPECS["rms_norm"].make_inputs(case, torch.float32, CPU)
    original = {k: v.detach().clone() for k, v in master.items()}
    seen_x = []

    def clobbering_call(x, weight):  # writes into its input, as Liger's cross entropy does
        seen_x.append(x.detach().clone())
        with torch.no_grad():
            x.mul_(2.0)
        return ks._eager_rms_norm(x, weight, 1e-6, 0.0, "llama")

    m = ks.measure(clobbering_call, master, CPU, ks.SMOKE_SETTINGS, lambda: None, FakeTimer)
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
    master = ks.SPECS["swiglu"].make_inputs(case, torch.float32, CPU)
    m = ks.measure(ks._eager_call(ks.SPECS["swiglu"], case, CPU), master, CPU, ks.SMOKE_SETTINGS,
                   lambda: None, FakeTimer)
    assert len(seen) == m.warmup_steps + 2 * m.repeats
    assert set(seen) == {(None, None)}


def test_repeats_are_clamped_by_the_settings():
    s = ks.Settings(loop_ms=100.0, min_repeats=5, max_repeats=50)
    assert ks._repeats_for(1.0, s) == 50
    assert ks._repeats_for(10.0, s) == 10
    assert ks._repeats_for(1000.0, s) == 5


# --------------------------------------------------------------------------- rows


def test_ok_row_statistics_and_bandwidth_from_a_fake_timer():
    case = _case("swiglu")
    master = ks.SPECS["swiglu"].make_inputs(case, torch.bfloat16, CPU)
    row = ks.run_impl(case, "eager", "bfloat16", master, _context(copy_gbps=2.0))
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
    master = ks.SPECS["cross_entropy"].make_inputs(case, torch.float32, CPU)
    eager = ks._eager_call(ks.SPECS["cross_entropy"], case, CPU)
    monkeypatch.setattr(ks, "_optkit_call", lambda spec, case, device: eager)
    row = ks.run_impl(case, "optkit", "float32", master, _context())
    assert row["status"] == "ok" and row["loss_in_forward"] is True
    assert row["gbps_fwd"] is None and row["gbps_bwd"] is None and row["gbps_full"] > 0
    eager_row = ks.run_impl(case, "eager", "float32", master, _context())
    assert eager_row["loss_in_forward"] is False


def test_flce_rows_carry_tflops():
    case = _case("fused_linear_cross_entropy")
    master = ks.SPECS[case.op].make_inputs(case, torch.float32, CPU)
    row = ks.run_impl(case, "eager", "float32", master, _context())
    flops = 6 * case.tokens * case.dims["H"] * case.dims["V"]
    assert row["flops_full"] == flops and row["tflops_full"] == pytest.approx(flops / 2e-3 / 1e12)
    assert "TFLOP/s" in ks.format_table([row])


@pytest.mark.parametrize("exc, status", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB"), "oom"),
    (RuntimeError("triton: out of resource: shared memory"), "error"),
])
def test_a_failing_impl_is_a_row_not_a_crash(monkeypatch, exc, status):
    def broken(**tensors):
        raise exc

    monkeypatch.setattr(ks, "resolve_impl", lambda *a: broken)
    case = _case("rms_norm")
    master = ks.SPECS["rms_norm"].make_inputs(case, torch.float32, CPU)
    row = ks.run_impl(case, "optkit", "float32", master, _context())
    assert row["status"] == status and str(exc) in row["error"] and row["full_ms"] is None


def test_missing_optkit_kernel_is_skipped_with_its_name(monkeypatch):
    spec = ks.SPECS["swiglu"]
    monkeypatch.setitem(ks.SPECS, "swiglu", ks.OpSpec(**{**spec.__dict__, "optkit_fn": "no_such_fn"}))
    case = _case("swiglu")
    master = ks.SPECS["swiglu"].make_inputs(case, torch.float32, CPU)
    row = ks.run_impl(case, "optkit", "float32", master, _context())
    assert row["status"] == "skipped" and "optkit.kernels.swiglu.no_such_fn" in row["error"]


def test_liger_not_installed_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", None)  # import -> ImportError
    with pytest.raises(ks.ImplUnavailable, match="pip install liger-kernel"):
        ks._liger_call(ks.SPECS["swiglu"], _case("swiglu"), torch.device("cuda"))
    with pytest.raises(ks.ImplUnavailable, match="CUDA only"):
        ks._liger_call(ks.SPECS["swiglu"], _case("swiglu"), CPU)


def test_liger_calls_map_our_inputs_to_its_functional_api(monkeypatch):
    calls = {}

    def recorder(name):
        def fn(*args, **kwargs):
            calls[name] = (args, kwargs)
            return args[0]
        return fn

    fake = types.ModuleType("liger_kernel.transformers.functional")
    for spec in ks.SPECS.values():
        setattr(fake, spec.liger_fn, recorder(spec.name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", fake)
    cuda = torch.device("cuda")  # resolving needs no GPU; the fakes run on CPU tensors
    for op in ks.OPS:
        case = _case(op)
        inputs = ks.SPECS[op].make_inputs(case, torch.float32, CPU)
        ks._liger_call(ks.SPECS[op], case, cuda)(**inputs)
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
    case = ks.Case("geglu", "t", {"T": 4, "I": 8}, {"approximate": "none"})
    with pytest.raises(ks.ImplUnavailable, match="tanh"):
        ks._liger_call(ks.SPECS["geglu"], case, torch.device("cuda"))


def test_compile_compiles_once_per_shape_across_token_counts():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cache = ks.CompileCache(backend=counting_backend)
    spec = ks.SPECS["rms_norm"]
    params = {"eps": 1e-6, "offset": 0.0, "cast_mode": "llama"}
    for tokens in (16, 24, 40):
        case = ks.Case("rms_norm", "t", {"T": tokens, "H": 32}, params)
        inputs = spec.make_inputs(case, torch.float32, CPU)
        out = cache.call_for(spec, case, CPU)(**inputs)
        torch.testing.assert_close(out, ks._eager_rms_norm(inputs["x"], inputs["weight"], **params))
    assert len(graphs) == 1, "a token sweep must reuse one compiled graph"
    other = ks.Case("rms_norm", "t", {"T": 16, "H": 48}, params)
    cache.call_for(spec, other, CPU)(**spec.make_inputs(other, torch.float32, CPU))
    assert len(graphs) == 2
    torch._dynamo.reset()


def test_rows_written_have_the_schema_and_parse(tmp_path):
    rows = ks.run_suite(tmp_path, run_id="r1", cpu_smoke=True, ops=("swiglu", "rope"),
                        impls=("eager", "compile", "liger"), env=FAKE_ENV, timer_factory=FakeTimer,
                        log=lambda m: None)
    written = read_rows(tmp_path / "results.jsonl")
    assert written == json.loads(json.dumps(rows)) and len(rows) == 6
    assert json.loads((tmp_path / "env.json").read_text())["git_sha"] == "abc"
    for row in written:
        assert set(row) == set(ks.KERNEL_ROW_FIELDS) and set(REQUIRED_FIELDS) <= set(row)
        assert (row["suite"], row["kind"], row["run_id"]) == ("kernels", "kernel", "r1")
        assert row["status"] in ("ok", "oom", "error", "skipped") and row["timestamp"]
        assert row["point_key"] == f"{row['op']}/{row['impl']}/{row['dtype']}/{row['shape']}"
    by_impl = {(r["op"], r["impl"]): r for r in written}
    assert by_impl[("swiglu", "eager")]["status"] == "ok"
    assert by_impl[("swiglu", "compile")]["status"] == "skipped"
    assert by_impl[("rope", "liger")]["error"] == "Liger-Kernel runs on CUDA only"
    table = ks.format_table(written)
    assert "swiglu" in table and "1.00" in table and "skipped" in table


def test_run_without_cuda_gives_skipped_rows_for_the_whole_sweep(tmp_path, monkeypatch):
    from optkit.compose import compose

    monkeypatch.setattr(ks.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("optkit.measure.env.capture_env", lambda: FAKE_ENV)
    cfg = compose(["suite=kernels"])
    assert cfg.suite.requires_cuda is True
    rows = ks.run(cfg, tmp_path / "run7")
    assert len(rows) == len(ks.sweep_cases()) * len(ks.IMPLS)
    assert {r["status"] for r in rows} == {"skipped"} and rows[0]["error"] == ks.NO_CUDA_REASON
    assert {r["run_id"] for r in rows} == {"run7"}
    assert "gradient computed in forward" not in ks.format_table(rows)  # the note is about ok rows


def test_cpu_smoke_times_optkit_kernels_with_the_host_clock(tmp_path):
    """The plumbing end to end on real (interpreted) optkit kernels and the real timer."""
    rows = ks.run_suite(tmp_path, cpu_smoke=True, ops=("rms_norm", "swiglu"), impls=("optkit", "eager"),
                        env=FAKE_ENV, log=lambda m: None)
    assert [(r["op"], r["impl"], r["status"]) for r in rows] == [
        ("rms_norm", "optkit", "ok"), ("rms_norm", "eager", "ok"), ("swiglu", "optkit", "ok"), ("swiglu", "eager", "ok")]
    for row in rows:
        assert row["full_ms"] > 0 and len(row["full_times_ms"]) == row["repeats"] and row["copy_gbps"] > 0
