"""bench.repeats in one process or one process each (bench.isolate_repeats), resume of missing
windows, and bench.profile on CPU: a gzip Chrome trace and a kernel-share table in the row."""

import gzip
import json
from pathlib import Path

import pytest

from optkit.bench import runner as runner
from optkit.measure.profile import CATEGORIES, DEVICE_SPLIT_FIELDS, TIME_SOURCE_CPU
from optkit.results.rows import empty_row, identity_fields, read_rows

TINY = [
    "suite=smoke",
    "model=tiny_llama",
    "opt=baseline",
    "train.warmup_steps=1",
    "train.steps=2",
    "train.batch_size=1",
    "data.seq_len=16",
    "bench.progress=false",
]


def _spy(monkeypatch, fake=None):
    """Record the repeats of every run_isolated call; run the real one unless ``fake`` is given."""
    calls = []
    real = runner.run_isolated

    def spy(point, run_id, repeats, timeout_s, **kw):
        calls.append(list(repeats))
        return (fake or real)(point, run_id, repeats, timeout_s, **kw)

    monkeypatch.setattr(runner, "run_isolated", spy)
    return calls


def _sweep(tmp_path, overrides):
    return runner.run_sweep([f"bench.results_dir={tmp_path}", *TINY, *overrides])


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """One point, 3 windows in one process, profiled (the expensive sweep, shared by the tests below)."""
    mp = pytest.MonkeyPatch()
    mp.chdir(Path(__file__).resolve().parents[2])
    calls = _spy(mp)
    run_dir = _sweep(tmp_path_factory.mktemp("profiled"), ["bench.repeats=3", "bench.profile=true"])
    mp.undo()
    return run_dir, read_rows(run_dir / "results.jsonl"), calls


def test_repeats_share_one_process_by_default(profiled):
    _, rows, calls = profiled
    assert calls == [[0, 1, 2]], "one subprocess measures the three windows"
    assert [r["repeat"] for r in rows] == [0, 1, 2]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert len({r["pid"] for r in rows}) == 1 and all(r["windows_in_process"] == 3 for r in rows)
    assert len({r["config_hash"] for r in rows}) == 1
    assert all(len(r["step_times_ms"]) == 2 for r in rows), "the profiled step is in no timing field"
    # one warm-up step, then 2 steps per window: each row's curve runs to the end of its window
    assert [len(r["loss_curve"]) for r in rows] == [3, 5, 7]
    assert rows[0]["step_times_ms"] != rows[1]["step_times_ms"], "separate windows"


def test_profile_on_cpu_writes_a_trace_and_a_kernel_share_table(profiled):
    run_dir, rows, _ = profiled
    *earlier, last = rows
    assert all(r["trace_path"] is None for r in earlier), "one profile per process, after its last window"
    assert last["profile_error"] is None and last["trace_path"].startswith("traces/")
    with gzip.open(run_dir / last["trace_path"], "rt") as fh:
        trace = json.load(fh)
    assert trace["traceEvents"] and any(e.get("cat") == "cpu_op" for e in trace["traceEvents"])
    assert last["profile_time_source"] == TIME_SOURCE_CPU
    # no device work to set against the host's time on a CPU: every host-vs-device field is None, not 0
    assert all(f in last and last[f] is None for f in DEVICE_SPLIT_FIELDS)
    share = last["profile_kernel_share"]
    assert [s["category"] for s in share] == list(CATEGORIES)
    assert sum(s["share_pct"] for s in share) == pytest.approx(100, abs=0.1)
    assert sum(s["time_ms"] for s in share) == pytest.approx(last["profile_step_ms"], rel=1e-3)
    assert {s["category"]: s["share_pct"] for s in share}["matmul"] > 0, "a Llama step does matmuls"
    top = last["profile_top_kernels"]
    assert 0 < len(top) <= 15 and top == sorted(top, key=lambda t: -t["total_ms"])
    assert any(t["name"] in ("aten::mm", "aten::addmm") for t in top)
    # no NVML on a CPU: its window fields stay empty instead of made up
    assert last["nvml_timed_window_ms"] is None and last["peak_nvml_timed_device_bytes"] is None


def test_isolated_repeats_run_one_process_each(tmp_path, monkeypatch):
    """An injected OOM ends each process before the model is built (real processes, kept cheap)."""
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("OPTKIT_INJECT_FAULT", "oom@tiny_llama")
    calls = _spy(monkeypatch)
    run_dir = _sweep(tmp_path, ["bench.repeats=3", "bench.isolate_repeats=true"])
    rows = read_rows(run_dir / "results.jsonl")
    assert calls == [[0], [1], [2]]
    assert [r["repeat"] for r in rows] == [0, 1, 2] and all(r["status"] == "oom" for r in rows)
    assert len({r["pid"] for r in rows}) == 3 and all(r["windows_in_process"] == 1 for r in rows)


def _fake_rows(point, run_id, repeats, timeout_s, point_cfg=None, run_dir=None, env=None):
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(point_cfg, resolve=True)
    return [dict(empty_row(), **identity_fields(config, point, run_id, r), status="skipped") for r in repeats]


@pytest.mark.parametrize("isolate, expected", [("false", [[1, 2]]), ("true", [[1], [2]])])
def test_resume_measures_only_the_missing_windows(tmp_path, monkeypatch, isolate, expected):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    calls = _spy(monkeypatch, fake=_fake_rows)
    overrides = ["bench.repeats=3", f"bench.isolate_repeats={isolate}", "bench.run_id=r1"]
    run_dir = _sweep(tmp_path, overrides)
    results = run_dir / "results.jsonl"
    first, *_ = results.read_text().splitlines()
    results.write_text(first + "\n")  # the sweep was killed after window 0 was written
    calls.clear()
    _sweep(tmp_path, [*overrides, "bench.resume=r1"])
    assert calls == expected
    assert sorted(r["repeat"] for r in read_rows(results)) == [0, 1, 2]


def test_report_renders_the_kernel_share_of_real_cpu_rows(profiled, tmp_path):
    from optkit.report import command as report

    run_dir, rows, _ = profiled
    assert report.main([str(run_dir), "--out", str(tmp_path), "--formats", ""]) == 0
    md = (tmp_path / "cpu" / "smoke" / "report.md").read_text()
    assert "where one step's time goes" in md and "host op self time" in md
    link = next(line for line in md.splitlines() if "[trace](" in line).split("[trace](")[1].split(")")[0]
    assert (tmp_path / "cpu" / "smoke" / link).resolve() == (run_dir / rows[-1]["trace_path"]).resolve()
