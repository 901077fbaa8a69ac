"""optkit regress on golden runs and synthetic candidates; the statistics helpers against scipy/numpy."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from optkit import regress
from optkit.measure.stats import mann_whitney_p, median_ci, ratio_ci

GOLDEN = Path(__file__).parent / "golden"
E2E_H100 = GOLDEN / "h100/e2e/golden-e2e-h100"
E2E_H200 = GOLDEN / "h200/e2e/golden-e2e-h200"
KERNELS = GOLDEN / "h100/kernels/golden-kernels"
SMOKE = GOLDEN / "cpu/smoke/golden-smoke"
E2E_KEYS = {json.loads(line)["opt"]: json.loads(line)["point_key"] for line in (E2E_H100 / "results.jsonl").open()}
FULL, LIGER = E2E_KEYS["full"], E2E_KEYS["liger"]


def rows_of(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip()]


def load_make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def candidate(tmp_path: Path, source: Path, edit, name: str = "candidate") -> Path:
    """A copy of ``source`` (same GPU / suite folders) with ``edit(row)`` applied to every row."""
    target = tmp_path / source.parent.parent.name / source.parent.name / name
    target.mkdir(parents=True)
    shutil.copy(source / "env.json", target / "env.json")
    rows = [json.loads(line) for line in (source / "results.jsonl").read_text().splitlines() if line.strip()]
    for row in rows:
        edit(row)
    (target / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return target


def slower(factor: float, point_key=None):
    """Every timed step of the point(s) takes ``factor`` times as long (tokens/s follows)."""

    def edit(row):
        if row["status"] != "ok" or (point_key and row["point_key"] != point_key):
            return
        for key in ("step_times_ms", "full_times_ms"):
            if row.get(key):
                row[key] = [t * factor for t in row[key]]
        for key in ("step_ms", "forward_ms", "backward_ms", "full_ms"):
            if row.get(key) is not None:
                row[key] *= factor
        if row.get("tokens_per_s"):
            row["tokens_per_s"] /= factor

    return edit


def run(tmp_path, baseline, cand, *extra):
    md = tmp_path / "summary.md"
    code = regress.main(["--baseline", str(baseline), "--candidate", str(cand), "--markdown", str(md), *extra])
    return code, md.read_text() if md.exists() else ""


def verdicts(baseline, cand, **limits):
    _, text, _ = regress.regress(baseline, cand, regress.Thresholds(**limits))
    out = {}
    section = None
    for line in text.splitlines():
        if line.startswith("## ") or line.startswith("<details><summary>"):
            section = line
        elif line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            out[(cells[0].strip("`"), cells[1])] = section
    return out


def test_identical_runs_pass(tmp_path):
    code, md = run(tmp_path, E2E_H100, candidate(tmp_path, E2E_H100, lambda r: None))
    assert code == 0
    assert md.startswith("# optkit regress: OK") and "20 unchanged" in md


def test_a_20_percent_slowdown_is_a_regression(tmp_path, capsys):
    code, md = run(tmp_path, E2E_H100, candidate(tmp_path, E2E_H100, slower(1.2, FULL)))
    assert code == 1
    assert md.startswith("# optkit regress: REGRESSION")
    found = verdicts(E2E_H100, tmp_path / "h100/e2e/candidate")
    assert found[(FULL, "step_ms")].startswith("## Regressions")
    assert found[(FULL, "tokens_per_s")].startswith("## Regressions")
    assert found[(LIGER, "step_ms")].startswith("<details><summary>Unchanged")
    assert "+20.0%" in md
    assert "REGRESSION" in capsys.readouterr().out  # printed for the CI log too


def test_a_1_percent_change_passes(tmp_path):
    code, md = run(tmp_path, E2E_H100, candidate(tmp_path, E2E_H100, slower(1.01)))
    assert code == 0 and "0 regression" in md


def test_faster_is_an_improvement_in_both_directions(tmp_path):
    """tokens/s going up (higher is better) and step time going down (lower is better) are both improvements."""
    cand = candidate(tmp_path, E2E_H100, slower(1 / 1.25, FULL))
    code, _ = run(tmp_path, E2E_H100, cand)
    assert code == 0
    found = verdicts(E2E_H100, cand)
    assert found[(FULL, "tokens_per_s")].startswith("## Improvements")
    assert found[(FULL, "step_ms")].startswith("## Improvements")


def test_memory_regression_is_detected(tmp_path):
    def more_memory(row):
        if row["point_key"] == LIGER:
            row["peak_allocated_bytes"] = int(row["peak_allocated_bytes"] * 1.2)

    cand = candidate(tmp_path, E2E_H100, more_memory)
    code, md = run(tmp_path, E2E_H100, cand)
    assert code == 1
    found = verdicts(E2E_H100, cand)
    assert found[(LIGER, "peak_allocated_bytes")].startswith("## Regressions")
    assert found[(LIGER, "step_ms")].startswith("<details><summary>Unchanged")


def test_memory_threshold_is_its_own(tmp_path):
    def more_memory(row):
        row["peak_allocated_bytes"] = int(row["peak_allocated_bytes"] * 1.08)

    cand = candidate(tmp_path, E2E_H100, more_memory)
    assert run(tmp_path, E2E_H100, cand, "--mem-threshold", "0.10")[0] == 0
    assert run(tmp_path, E2E_H100, cand, "--mem-threshold", "0.05")[0] == 1


def _noisy_run(root: Path, run_id: str, step_ms: float, rel_sd: float) -> Path:
    """One point; equal run ids draw equal noise, so two runs differ by exactly step_ms's ratio."""
    golden = load_make_golden()
    rows = [golden.train_row(golden.H100, "e2e", run_id, "llama3_8b", "full", step_ms=step_ms, rel_sd=rel_sd)]
    return golden.write_run(root, golden.H100, "e2e", run_id, rows)


def test_a_change_beyond_the_threshold_but_within_noise_is_not_a_regression(tmp_path):
    base = _noisy_run(tmp_path / "a", "noisy", 900.0, rel_sd=0.35)
    cand = _noisy_run(tmp_path / "b", "noisy", 900.0 * 1.08, rel_sd=0.35)
    code, md = run(tmp_path, base, cand)
    assert code == 0
    assert "## Beyond the threshold but within noise" in md
    # the same shift with quiet steps is a regression: the noise is what saved it
    quiet_base = _noisy_run(tmp_path / "c", "quiet", 900.0, rel_sd=0.01)
    quiet_cand = _noisy_run(tmp_path / "d", "quiet", 900.0 * 1.08, rel_sd=0.01)
    assert run(tmp_path, quiet_base, quiet_cand)[0] == 1


def test_too_few_samples_is_insufficient_data(tmp_path):
    cand = candidate(tmp_path, SMOKE, slower(1.5))  # smoke rows have 3 timed steps
    code, md = run(tmp_path, SMOKE, cand)
    assert code == 0
    assert "## Insufficient data" in md and "3 vs 3 samples" in md


def test_a_point_that_now_fails_is_a_regression(tmp_path):
    def oom(row):
        if row["point_key"] == FULL:
            row.update(status="oom", error="torch.OutOfMemoryError: CUDA out of memory", step_times_ms=None)

    code, md = run(tmp_path, E2E_H100, candidate(tmp_path, E2E_H100, oom))
    assert code == 1 and "| status | ok | oom |" in md


def test_kernel_rows_match_by_op_and_impl(tmp_path):
    key = "swiglu/optkit/bfloat16/8192x14336"
    cand = candidate(tmp_path, KERNELS, slower(1.2, key))
    code, _ = run(tmp_path, KERNELS, cand)
    assert code == 1
    found = verdicts(KERNELS, cand)
    assert found[(key, "full_ms")].startswith("## Regressions")
    assert found[("swiglu/eager/bfloat16/8192x14336", "full_ms")].startswith("<details><summary>Unchanged")
    assert [k for k, v in found.items() if v.startswith("## Regressions")] == [(key, "full_ms")]


def _without_lines(tmp_path, source, drop) -> Path:
    """A copy of ``source`` without the rows for which ``drop(row)`` holds."""
    partial = candidate(tmp_path / "src", source, lambda r: None)
    lines = (partial / "results.jsonl").read_text().splitlines()
    (partial / "results.jsonl").write_text("".join(line + "\n" for line in lines if not drop(json.loads(line))))
    return partial


def test_missing_points_fail_the_gate_unless_allowed(tmp_path, capsys):
    partial = _without_lines(tmp_path, E2E_H100, lambda r: r["point_key"] in (FULL, LIGER))
    code, md = run(tmp_path, E2E_H100, partial)
    assert code == 1 and md.startswith("# optkit regress: FAIL") and f"- missing in candidate: `{FULL}`" in md
    err = capsys.readouterr().err
    fails = [line for line in err.splitlines() if line.startswith("optkit regress: FAIL:")]
    assert len(fails) == 1 and "2 baseline point(s) missing" in fails[0] and "--allow-missing 2" in fails[0]
    assert "Traceback" not in err
    assert run(tmp_path, E2E_H100, partial, "--allow-missing", "1")[0] == 1  # the allowance is a count
    capsys.readouterr()
    assert run(tmp_path, E2E_H100, partial, "--allow-missing", "2")[0] == 0
    assert run(tmp_path, E2E_H100, partial, "--allow-missing")[0] == 0  # the flag alone: any number
    assert "FAIL" not in capsys.readouterr().err


def _append_raw(run_dir: Path, text: str) -> None:
    with open(run_dir / "results.jsonl", "a") as fh:
        fh.write(text)


def test_a_torn_candidate_line_fails_the_gate_and_is_named(tmp_path, capsys):
    """A kill mid-write leaves the last point's row torn: the point is lost, and the gate says both."""
    cand = _without_lines(tmp_path, E2E_H100, lambda r: r["point_key"] == FULL)
    torn = json.dumps(next(r for r in rows_of(E2E_H100) if r["point_key"] == FULL))[:300]
    _append_raw(cand, torn)  # no newline: the write was cut short
    n_lines = len((cand / "results.jsonl").read_text().splitlines())
    code, md = run(tmp_path, E2E_H100, cand)
    assert code == 1 and f"results.jsonl:{n_lines} (torn" in md
    fails = [line for line in capsys.readouterr().err.splitlines() if "FAIL:" in line]
    assert len(fails) == 2 and "--allow-bad-lines 1" in fails[0] and "missing" in fails[1]
    assert run(tmp_path, E2E_H100, cand, "--allow-bad-lines")[0] == 1  # the point is still missing
    assert run(tmp_path, E2E_H100, cand, "--allow-bad-lines", "--allow-missing")[0] == 0


def test_rowless_lines_are_counted_and_named_and_not_rows(tmp_path, capsys):
    cand = candidate(tmp_path, E2E_H100, lambda r: None)
    _append_raw(cand, "[1, 2, 3]\n{}\n\n")
    code, md = run(tmp_path, E2E_H100, cand)
    assert code == 1
    assert "2 line(s) hold no result row" in md and ":6 (JSON list" in md and ":7 (an object without status" in md
    assert "None" not in md.split("## Gate failures")[0]  # no "None" point from the {} row
    code, md = run(tmp_path, E2E_H100, cand, "--allow-bad-lines", "2")
    assert code == 0 and "- warning: candidate (allowed by --allow-bad-lines): 2 line(s)" in md
    # in the baseline the same lines are a warning
    code, md = run(tmp_path, cand, E2E_H100)
    assert code == 0 and "- warning: baseline: 2 line(s) hold no result row" in md


def test_stored_tokens_per_s_must_agree_with_the_step_times(tmp_path, capsys):
    """An edited row (tokens/s raised 10%, step times left alone) fails; no allowance lets it through."""

    def inflate(row):
        if row["point_key"] == FULL and row["status"] == "ok":
            row["tokens_per_s"] *= 1.1

    cand = candidate(tmp_path, E2E_H100, inflate)
    code, md = run(tmp_path, E2E_H100, cand, "--allow-missing", "--allow-bad-lines")
    assert code == 1 and f"`{FULL}` window 0: stored" in md
    fails = [line for line in capsys.readouterr().err.splitlines() if "FAIL:" in line]
    assert len(fails) == 1 and "tokens_per_s disagrees" in fails[0]
    # step times and tokens/s moved together (a real slowdown) is no mismatch
    code, md = run(tmp_path, E2E_H100, candidate(tmp_path, E2E_H100, slower(1.2, FULL), "slow"))
    assert "tokens_per_s disagrees" not in md
    assert run(tmp_path, cand, E2E_H100)[0] == 0  # in the baseline: a warning


def test_golden_rows_agree_with_their_step_times():
    from optkit.report.run_checks import tokens_per_s_mismatches
    from optkit.results.runs import load_run

    for run_dir in (E2E_H100, SMOKE, GOLDEN / "h100/ablation/golden-ablation", GOLDEN / "h100/scaling/golden-scaling"):
        assert tokens_per_s_mismatches(load_run(run_dir)) == [], run_dir


@pytest.mark.parametrize(
    "content, message",
    [("{not json", "is not valid JSON at line 1"), ("[1, 2]", "holds a JSON list"), (b"\xff\xfe", "not valid JSON")],
)
def test_corrupt_env_json_is_one_line_exit_2(tmp_path, capsys, content, message):
    cand = candidate(tmp_path, E2E_H100, lambda r: None)
    (cand / "env.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    assert run(tmp_path, E2E_H100, cand)[0] == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "delete it" in err and "Traceback" not in err


def test_a_run_without_a_valid_row_is_one_line_exit_2(tmp_path, capsys):
    cand = candidate(tmp_path, E2E_H100, lambda r: None)
    (cand / "results.jsonl").write_text('{"status": "ok"\n[1]\n{}\n')
    assert run(tmp_path, E2E_H100, cand)[0] == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no valid result row (3 line(s)" in err


def test_a_negative_allowance_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, E2E_H100, E2E_H100, "--allow-missing", "-1")
    assert exit_info.value.code == 2 and "negative" in capsys.readouterr().err


def test_different_gpus_exit_2(tmp_path, capsys):
    assert run(tmp_path, E2E_H100, E2E_H200)[0] == 2
    assert "'h100'" in capsys.readouterr().err


def test_no_common_points_exit_2(tmp_path, capsys):
    assert run(tmp_path, E2E_H100, KERNELS)[0] == 2
    assert "no point" in capsys.readouterr().err


def test_missing_files_exit_2(tmp_path, capsys):
    assert run(tmp_path, E2E_H100, tmp_path / "nothing-here")[0] == 2
    assert "no results.jsonl" in capsys.readouterr().err


def test_a_different_software_stack_warns_or_fails_when_strict(tmp_path, capsys):
    cand = candidate(tmp_path, E2E_H100, lambda r: r.update(torch="2.12.0+cu130"))
    env = json.loads((cand / "env.json").read_text())
    (cand / "env.json").write_text(json.dumps({**env, "torch_version": "2.12.0+cu130"}))
    code, md = run(tmp_path, E2E_H100, cand)
    assert code == 0 and "torch 2.11.0+cu130 -> 2.12.0+cu130" in md
    assert run(tmp_path, E2E_H100, cand, "--strict-env")[0] == 2


def test_judge_is_direction_aware():
    rng = np.random.default_rng(0)
    low = [list(100 + rng.standard_normal(30))]
    high = [list(130 + rng.standard_normal(30))]
    limits = regress.Thresholds()
    assert regress.judge(low, high, "high", 0.05, False, limits)["verdict"] == "improvement"
    assert regress.judge(low, high, "low", 0.05, False, limits)["verdict"] == "regression"
    assert regress.judge(high, low, "high", 0.05, False, limits)["verdict"] == "regression"
    assert regress.judge([[10.0]], [[12.0]], "low", 0.05, True, limits)["verdict"] == "regression"  # exact counter
    overlapping = regress.judge([[10.0], [13.0]], [[12.0], [12.5]], "low", 0.05, True, limits)
    assert overlapping["verdict"] == "noise"


# ------------------------------------------------------------------ optkit.measure.stats (bootstrap, Mann-Whitney)


def test_mann_whitney_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    for n1, n2, shift in ((6, 6, 0.0), (11, 17, 0.7), (40, 33, 0.3)):
        a = np.round(rng.normal(10, 1, n1), 1)  # rounding makes ties
        b = np.round(rng.normal(10 + shift, 1, n2), 1)
        expected = stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic").pvalue
        assert mann_whitney_p(a, b) == pytest.approx(expected, rel=1e-9)


def test_bootstrap_ci_covers_and_accounts_for_windows():
    rng = np.random.default_rng(5)
    samples = rng.normal(50.0, 2.0, 40)
    med, low, high = median_ci([samples])
    assert med == pytest.approx(np.median(samples)) and low < med < high
    ratio, low, high = ratio_ci([samples * 1.1], [samples])
    assert ratio == pytest.approx(1.1) and low < 1.1 < high
    # windows that disagree (clocks, neighbours): the CI must be wider than for their steps pooled as one window
    windows = [rng.normal(mean, 0.3, 30) for mean in (50.0, 51.0, 52.0, 53.0)]
    _, lo_w, hi_w = median_ci(windows)
    _, lo_p, hi_p = median_ci([np.concatenate(windows)])
    assert hi_w - lo_w > 2 * (hi_p - lo_p)
