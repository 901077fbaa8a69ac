"""bench.interleave: windows in rounds, one process each (A B C A B C ...); a suite's fixed bench.* entries as the
sweep's defaults (the user's still win); every point's process gets bench.alloc_conf and its entry module."""

from __future__ import annotations

from optkit.bench import runner
from optkit.bench.point_process import ALLOC_ENV, entry_module, point_env, with_entry_module
from optkit.bench.schedule import suite_bench_overrides, window_jobs
from optkit.config.compose import compose
from optkit.results.rows import empty_row, identity_fields, read_rows
from tests.bench.test_runner_repeats import TINY


def test_window_jobs_orders():
    todo = [[0, 1, 2], [0, 1, 2], [1, 2]]  # the third point's window 0 is done (resume)
    assert window_jobs(todo, isolate=False, interleave=False) == [(0, [0, 1, 2]), (1, [0, 1, 2]), (2, [1, 2])]
    assert window_jobs(todo, isolate=True, interleave=False) == [
        (0, [0]),
        (0, [1]),
        (0, [2]),
        (1, [0]),
        (1, [1]),
        (1, [2]),
        (2, [1]),
        (2, [2]),
    ]
    assert window_jobs(todo, isolate=False, interleave=True) == [
        (0, [0]),
        (1, [0]),
        (0, [1]),
        (1, [1]),
        (2, [1]),
        (0, [2]),
        (1, [2]),
        (2, [2]),
    ]
    assert window_jobs([[], []], isolate=False, interleave=True) == []


def test_headline_suites_interleave_three_processes_by_default():
    for suite in ("e2e", "qlora_stack"):
        assert set(suite_bench_overrides(suite)) == {
            "bench.repeats=3",
            "bench.isolate_repeats=true",
            "bench.interleave=true",
        }, suite
    assert suite_bench_overrides("smoke") == [] and suite_bench_overrides("no_such_suite") == []


def test_sweep_runs_rounds_and_the_user_overrides_the_suite(tmp_path, monkeypatch):
    calls = []

    def fake(point, run_id, repeats, timeout_s, point_cfg=None, **kw):
        calls.append((next(p for p in point if p.startswith("opt=")), list(repeats)))
        rows = []
        for r in repeats:
            row = empty_row()
            row.update(identity_fields(runner._container(point_cfg), point, run_id, r), status="ok")
            rows.append(row)
        return rows

    monkeypatch.setattr(runner, "run_isolated", fake)
    base = [f"bench.results_dir={tmp_path}", *TINY, "opt=baseline,full", "bench.isolate_repeats=true"]
    run_dir = runner.run_sweep([*base, "bench.repeats=2", "bench.interleave=true"])
    assert calls == [("opt=baseline", [0]), ("opt=full", [0]), ("opt=baseline", [1]), ("opt=full", [1])]
    assert len(read_rows(run_dir / "results.jsonl")) == 4
    calls.clear()
    runner.run_sweep([*base, "bench.repeats=2", "bench.run_id=plain"])
    assert calls == [("opt=baseline", [0]), ("opt=baseline", [1]), ("opt=full", [0]), ("opt=full", [1])]


def test_every_point_gets_the_allocator_config_and_unsloth_its_own_entry():
    plain = runner._container(compose(["opt=baseline", "bench.alloc_conf=expandable_segments:False"]))
    env = point_env(plain, {"PYTORCH_ALLOC_CONF": "from the shell", "PATH": "/bin"})
    assert all(env[name] == "expandable_segments:False" for name in ALLOC_ENV) and env["PATH"] == "/bin"
    assert "HF_HUB_OFFLINE" not in env and entry_module(plain) == "optkit.bench.point"
    unsloth = runner._container(compose(["opt=unsloth"]))
    assert point_env(unsloth, {})["UNSLOTH_DISABLE_STATISTICS"] == "1"
    cmd = ["python", "-m", "torch.distributed.run", "-m", "optkit.bench.point", "--out", "x"]
    assert with_entry_module(cmd, unsloth)[4] == "optkit.bench.unsloth_point"
    assert with_entry_module(cmd, plain) == cmd
