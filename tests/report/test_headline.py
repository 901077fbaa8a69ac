"""The headline's CIs over processes (report/headline_stats.py, checked against scipy), its table and verdicts
(report/headline.py), and the cross-GPU report pairing runs of one commit only."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from optkit.report import headline_stats as hs
from optkit.report.cross_gpu import same_commit, write_cross_gpu
from optkit.report.headline import headline_lines, lora_math
from optkit.results.runs import Run, group_points

scipy_stats = pytest.importorskip("scipy.stats")
scipy_special = pytest.importorskip("scipy.special")


@pytest.mark.parametrize("df", [1, 2, 3, 4.5, 10, 37, 400])
@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_matches_scipy(df, p):
    assert hs.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)
    assert hs.t_quantile(1 - p, df) == pytest.approx(scipy_stats.t.ppf(1 - p, df), rel=1e-9)


@pytest.mark.parametrize("a, b, x", [(0.5, 0.5, 0.3), (2.0, 0.5, 0.9), (10.0, 3.0, 0.5), (0.7, 40.0, 0.01)])
def test_incomplete_beta_matches_scipy(a, b, x):
    assert hs.incomplete_beta(a, b, x) == pytest.approx(scipy_special.betainc(a, b, x), rel=1e-10, abs=1e-14)


def test_intervals_match_scipy_on_log_values():
    rng = random.Random(3)
    a = [10_000 * math.exp(rng.gauss(0, 0.05)) for _ in range(3)]
    b = [9_000 * math.exp(rng.gauss(0, 0.08)) for _ in range(4)]
    logs_a, logs_b = [math.log(v) for v in a], [math.log(v) for v in b]
    est, low, high = hs.geometric_mean_ci(a)
    ref = scipy_stats.t.interval(0.95, len(a) - 1, loc=sum(logs_a) / 3, scale=scipy_stats.sem(logs_a))
    assert (math.log(low), math.log(high)) == pytest.approx(ref, rel=1e-9)
    assert est == pytest.approx(math.exp(sum(logs_a) / 3))
    ratio, low, high = hs.ratio_ci(a, b)
    welch = scipy_stats.ttest_ind(logs_a, logs_b, equal_var=False).confidence_interval(0.95)
    assert (math.log(low), math.log(high)) == pytest.approx((welch.low, welch.high), rel=1e-9)
    assert hs.ratio_ci(a[:1], b)[1] is None and hs.geometric_mean_ci(a[:1])[1] is None


def _row(opt, run_id, pid, step_ms, tokens=4096, status="ok", requested=(), **extra):
    jitter = random.Random(hash((opt, pid))).random
    return {
        "status": status,
        "opt": opt,
        "model": "llama3_8b",
        "run_id": run_id,
        "pid": pid,
        "point_key": f"llama3_8b/lora/b2/s2048/{opt}",
        "setting_key": "llama3_8b/lora/b2/s2048",
        "train_method": "lora",
        "dtype": "bfloat16",
        "tokens_per_step": tokens,
        "step_times_ms": [step_ms * (1 + 0.01 * jitter()) for _ in range(20)],
        "requested_optimizations": list(requested),
        "applied_optimizations": list(requested),
        "config": {"opt": {"adapter_dtype": extra.pop("adapter_dtype", "float32"), "unsloth": opt == "unsloth"}},
        "lora_adapter_dtype": extra.pop("lora_adapter_dtype", "float32"),
        "peak_nvml_timed_device_bytes": extra.pop("mem", 20) * 2**30,
        "loss_last": 12.3,
        **extra,
    }


def _sweep(steps_by_opt, requested_by_opt, processes=3):
    rows = []
    for p in range(processes):  # interleaved rounds, as bench.interleave runs them
        for opt, steps in steps_by_opt.items():
            rows.append(_row(opt, "run", f"{opt}-{p}", steps[p], requested=requested_by_opt.get(opt, ())))
    return group_points(rows)


def test_headline_names_the_strongest_peer_and_the_verdicts():
    points = _sweep(
        {
            "baseline": [700, 710, 705],
            "unsloth": [390, 420, 400],
            "liger": [600, 610, 605],
            "full": [360, 362, 361],
            "full_compile": [395, 405, 415],
        },
        {"unsloth": ["unsloth"], "liger": ["liger"], "full": ["fused_lora"], "full_compile": ["fused_lora", "compile"]},
    )
    text = "\n".join(headline_lines(points, "baseline"))
    assert "Strongest peer by tokens/s: `unsloth`" in text
    assert "`full` vs `unsloth`:" in text and "faster (the CI excludes a tie)" in text
    assert "`full_compile` vs `unsloth`:" in text and "a tie within the CI" in text
    assert "| baseline | fp32 | 3 (3) |" in text and "Student t interval over processes" in text


def test_one_process_per_point_gets_no_headline():
    assert (
        headline_lines(_sweep({"baseline": [700], "full": [360]}, {"full": ["fused_lora"]}, processes=1), "baseline")
        == []
    )


def test_windows_of_one_process_are_one_figure():
    rows = [_row("full", "run", 7, ms) for ms in (300, 400, 500)] + [_row("full", "run", 8, 400, status="oom")]
    (figure,) = hs.process_figures(rows)
    assert figure.windows == 3 and figure.tokens_per_s == pytest.approx(4096 / 0.4, rel=0.02)


@pytest.mark.parametrize(
    "opt, requested, adapter, stored, label",
    [
        ("baseline", [], "float32", "float32", "fp32"),
        ("baseline_bf16", [], "model", "bfloat16", "bf16"),
        ("full", ["fused_lora"], "float32", "float32", "bf16 (fp32 weights)"),
        ("unsloth", ["unsloth"], "float32", "bfloat16", "Unsloth's (bf16 weights)"),
    ],
)
def test_lora_math_labels(opt, requested, adapter, stored, label):
    head = _row(opt, "r", 1, 100, requested=requested, adapter_dtype=adapter, lora_adapter_dtype=stored)
    assert lora_math(head) == label


def _run(tmp_path: Path, slug: str, sha: str, name: str) -> Run:
    rows = [
        {
            **_row("baseline", name, 1, 700),
            "gpu_slug": slug,
            "suite": "e2e",
            "git_sha": sha,
            "timestamp": f"2026-01-0{len(name)}T00:00:00+00:00",
        }
    ]
    path = tmp_path / slug / "e2e" / name
    path.mkdir(parents=True)
    (path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return Run(path, {"git_sha": sha}, rows, slug, "e2e", name)


def test_cross_gpu_pairs_runs_of_one_commit_only(tmp_path):
    h100 = [_run(tmp_path, "h100", "aaa", "r1"), _run(tmp_path, "h100", "bbb", "r22")]
    h200 = [_run(tmp_path, "h200", "bbb", "r333")]
    paired, sha = same_commit({"h100": h100, "h200": h200})
    assert sha == "bbb" and [r.run_id for r in paired["h100"]] == ["r22"]
    report = write_cross_gpu({"h100": h100[:1], "h200": h200}, tmp_path / "reports", formats=())
    assert "nothing is paired" in report.read_text()
