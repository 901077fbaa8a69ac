"""The sweep runner: expansion, isolation (oom / crash / timeout rows), resume, row schema."""

import json
from pathlib import Path

import pytest

from optkit.bench import runner as runner
from optkit.config.compose import ConfigError, compose
from optkit.results.rows import ROW_FIELDS, SCHEMA_VERSION, STATUSES, read_rows

TINY = ["train.warmup_steps=1", "train.steps=2", "train.batch_size=1", "data.seq_len=16", "bench.progress=false"]


def test_expansion_is_the_cartesian_product_and_user_overrides_win():
    suite = compose(["suite=smoke"]).suite
    points = runner.expand_points(suite, ["train.steps=7"])
    assert len(points) == len(suite.axes.model) * len(suite.axes.opt)
    for p in points:
        assert p[-1] == "train.steps=7"  # user override last: it wins over suite.fixed
        assert sum(x.startswith("model=") for x in p) == 1
    assert len({tuple(p) for p in points}) == len(points)


def test_user_axis_override_replaces_the_axis():
    suite = compose(["suite=smoke"]).suite
    points = runner.expand_points(suite, ["model=tiny_qwen3", "opt=baseline,kernels"])
    assert len(points) == 2
    assert all("model=tiny_qwen3" in p for p in points)
    assert {p[[x.startswith("opt=") for x in p].index(True)] for p in points} == {"opt=baseline", "opt=kernels"}


def test_ablation_expands_to_baseline_full_and_each_on_and_off():

    suite = compose(["suite=ablation"]).suite
    points = runner.expand_points(suite, [], runner.model_family)
    names = [
        next(x.split("=", 1)[1] for x in p if x.startswith("opt.name="))
        for p in points
        if any(x.startswith("opt.name=") for x in p)
    ]
    assert any("opt=baseline" in p for p in points) and any("opt=full" in p for p in points)
    assert "only_rms_norm" in names and "full_minus_rms_norm" in names
    assert "only_geglu" not in names, "geglu does not apply to llama"
    assert "only_compile" not in names, "peers are not ablated"
    for p in points:  # every ablation point composes
        cfg = compose(p)
        assert cfg.opt.name


def _sweep(tmp_path, overrides, monkeypatch, fault=None):
    if fault:
        monkeypatch.setenv("OPTKIT_INJECT_FAULT", fault)
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    return runner.run_sweep([f"bench.results_dir={tmp_path}", *TINY, *overrides])


def test_oom_and_crash_become_rows_and_the_sweep_goes_on(tmp_path, monkeypatch):
    run_dir = _sweep(
        tmp_path, ["suite=smoke", "model=tiny_llama,tiny_qwen3", "opt=baseline"], monkeypatch, fault="oom@tiny_llama"
    )
    rows = read_rows(run_dir / "results.jsonl")
    assert [r["status"] for r in rows] == ["oom", "ok"]
    assert "out of memory" in rows[0]["error"].lower()
    monkeypatch.setenv("OPTKIT_INJECT_FAULT", "crash@tiny_qwen3")
    run_dir = runner.run_sweep(
        [
            f"bench.results_dir={tmp_path}",
            *TINY,
            "suite=smoke",
            "model=tiny_qwen3,tiny_llama",
            "opt=baseline",
            "bench.run_id=crash",
        ]
    )
    rows = read_rows(run_dir / "results.jsonl")
    assert [r["status"] for r in rows] == ["error", "ok"]
    assert "exited with code" in rows[0]["error"] and rows[0]["model"] == "tiny_qwen3"


def test_timeout_becomes_a_row(tmp_path, monkeypatch):
    run_dir = _sweep(
        tmp_path,
        ["suite=smoke", "model=tiny_llama", "opt=baseline", "bench.timeout_s=10"],
        monkeypatch,
        fault="hang@tiny_llama",
    )
    rows = read_rows(run_dir / "results.jsonl")
    assert [r["status"] for r in rows] == ["timeout"]


def test_killed_sweep_resumes_without_redoing_points(tmp_path, monkeypatch):
    calls = []

    def fake_run_isolated(point, run_id, repeats, timeout_s, **kw):
        calls.append(point)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the sweep is killed while the third point runs
        return real_run_isolated(point, run_id, repeats, timeout_s, **kw)

    real_run_isolated = runner.run_isolated
    monkeypatch.setattr(runner, "run_isolated", fake_run_isolated)
    overrides = ["suite=smoke", "model=tiny_llama,tiny_qwen3,tiny_gemma2", "opt=baseline", "bench.run_id=r1"]
    with pytest.raises(KeyboardInterrupt):
        _sweep(tmp_path, overrides, monkeypatch)
    calls.clear()
    monkeypatch.setattr(runner, "run_isolated", lambda *a, **k: (calls.append(a[0]), real_run_isolated(*a, **k))[1])
    run_dir = runner.run_sweep([f"bench.results_dir={tmp_path}", *TINY, *overrides, "bench.resume=r1"])
    rows = read_rows(run_dir / "results.jsonl")
    assert len(calls) == 1, "only the point not yet done runs again"
    assert len(rows) == 3 and len({r["config_hash"] for r in rows}) == 3


def test_row_schema(tmp_path, monkeypatch):
    run_dir = _sweep(tmp_path, ["suite=smoke", "model=tiny_llama", "opt=baseline"], monkeypatch)
    env = json.loads((run_dir / "env.json").read_text())
    assert "torch_version" in env and "git_sha" in env
    (row,) = read_rows(run_dir / "results.jsonl")
    assert set(ROW_FIELDS) <= set(row), f"missing: {set(ROW_FIELDS) - set(row)}"
    assert row["schema_version"] == SCHEMA_VERSION and row["status"] in STATUSES
    assert row["status"] == "ok", row["error"]
    assert row["tokens_per_step"] == 16 and row["tokens_per_s"] > 0
    assert row["step_ms"] > 0 and len(row["step_times_ms"]) == 2
    assert row["forward_ms"] > 0 and row["backward_ms"] > 0 and row["optimizer_ms"] > 0
    assert row["forward_ms"] + row["backward_ms"] + row["optimizer_ms"] <= row["step_ms"] * 1.5
    assert len(row["loss_curve"]) == 3 and row["loss_last"] == row["loss_curve"][-1]
    assert row["timer"] == "host_clock" and row["peak_rss_bytes"] > 0
    assert row["mfu"] is None, "no GPU: unknown peak, never a made-up MFU"
    assert row["device"] == "cpu" and row["gpu_slug"] == "cpu"
    assert row["config"]["model"]["name"] == "tiny_llama" and len(row["config_hash"]) == 16
    assert run_dir.parts[-3:-1] == ("cpu", "smoke")
    # where the process's time went before the first step: each part, and the imports before the point
    assert set(row["setup_s"]) == {"model", "distribute", "optimizer", "batches"}
    assert all(t >= 0 for t in row["setup_s"].values()) and row["setup_s"]["model"] > 0
    assert sum(row["setup_s"].values()) < row["duration_s"]
    assert 0 < row["process_start_s"] < 600, "a point process starts within its own lifetime"


def test_a_gpu_requirement_on_cpu_is_one_config_error_before_any_point(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_cuda_available", lambda: False)
    spawned = []
    monkeypatch.setattr(runner, "run_isolated", lambda *a, **k: spawned.append(a))
    with pytest.raises(ConfigError, match="suite=smoke"):
        _sweep(tmp_path, ["suite=e2e", "model=tiny_llama", "opt=baseline,full"], monkeypatch)
    with pytest.raises(ConfigError, match="bench.device=cpu"):
        _sweep(tmp_path, ["suite=smoke", "model=tiny_llama", "opt=baseline", "bench.device=cuda"], monkeypatch)
    assert not spawned and not any(tmp_path.iterdir()), "refused before any process or directory"


def test_a_cuda_point_on_a_cpu_device_is_a_skipped_row():
    from optkit.bench.point import run_point
    from optkit.config.compose import typed_config

    cfg = typed_config(compose(["model=tiny_llama", "bench.device=cuda"]))
    (row,) = run_point(cfg, [], run_id="t")
    if not __import__("torch").cuda.is_available():
        assert row["status"] == "skipped" and "CUDA" in row["error"]


def test_cli_lists_choices_and_rejects_unknown_names(capsys):
    from optkit.cli import main

    assert main(["bench", "model=llama9"]) == 2
    assert "tiny_llama" in capsys.readouterr().err
    assert main(["bench", "suite=nope"]) == 2
    assert "smoke" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("llama3_8b", "kernels.rms_norm", "smoke", "ablation"):
        assert word in out
