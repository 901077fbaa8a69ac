"""optkit report on inputs a crash, a kill or a hand edit leaves behind, and on CPU runs: every problem is one
line (no traceback) with the exit code a script can test, skipped lines are counted and named, CPU reports
carry the Triton-interpreter caveat, and bars never draw a missing value as a zero or a 0.003x point as 0.00x.
"""

import json
import shutil
from pathlib import Path

import pytest

from optkit.report import command as report
from optkit.report import plots
from optkit.report.tables import _ratio_cell

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
SMOKE = GOLDEN / "cpu/smoke/golden-smoke"
E2E_H100 = GOLDEN / "h100/e2e/golden-e2e-h100"


def copy_run(tmp_path: Path, source: Path) -> Path:
    target = tmp_path / "runs" / source.parent.parent.name / source.parent.name / source.name
    shutil.copytree(source, target)
    return target


def render(tmp_path: Path, run_dir: Path, capsys):
    code = report.main([str(run_dir), "--out", str(tmp_path / "reports"), "--formats", ""])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.err


def report_md(tmp_path: Path, run_dir: Path) -> str:
    return (tmp_path / "reports" / run_dir.parent.parent.name / run_dir.parent.name / "report.md").read_text()


def test_lines_without_a_row_are_skipped_counted_and_named(tmp_path, capsys):
    run_dir = copy_run(tmp_path, E2E_H100)
    results = run_dir / "results.jsonl"
    first = results.read_text().splitlines()[0]
    with open(results, "a") as fh:  # a torn line mid-file (the next row starts on a line of its own), then junk
        fh.write(first[:200] + "\n[1, 2, 3]\n{}\n\n" + first + "\n")
    code, err = render(tmp_path, run_dir, capsys)
    assert code == 0
    warnings = [line for line in err.splitlines() if "hold no result row" in line]
    assert len(warnings) == 1 and "3 line(s)" in warnings[0]
    for number, reason in ((6, "torn"), (7, "JSON list"), (8, "an object without status")):
        assert f"results.jsonl:{number} ({reason}" in warnings[0]
    md = report_md(tmp_path, run_dir)
    assert "3 line(s) hold no result row and are skipped" in md
    assert "## None" not in md and "`None`" not in md  # the {} row is no point


@pytest.mark.parametrize("content", ["{}\n{}\n", "[1, 2, 3]\n", '{"status": "ok", "model": "llama3_8b"'])
def test_a_run_without_a_valid_row_is_one_line_exit_2(tmp_path, capsys, content):
    run_dir = copy_run(tmp_path, E2E_H100)
    (run_dir / "results.jsonl").write_text(content)
    code, err = render(tmp_path, run_dir, capsys)
    assert code == 2 and err.count("\n") == 1 and "holds no valid result row" in err


@pytest.mark.parametrize("content", ["{", "[]", "\x00\xff"])
def test_corrupt_env_json_is_one_line_exit_2_naming_the_fix(tmp_path, capsys, content):
    run_dir = copy_run(tmp_path, E2E_H100)
    (run_dir / "env.json").write_bytes(content.encode("latin-1"))
    code, err = render(tmp_path, run_dir, capsys)
    assert code == 2 and err.count("\n") == 1 and "env.json" in err and "delete it" in err
    (run_dir / "env.json").unlink()  # the fix it names works: the environment then comes from the rows
    code, _ = render(tmp_path, run_dir, capsys)
    assert code == 0 and "NVIDIA H100" in report_md(tmp_path, run_dir)


def test_cpu_reports_carry_the_interpreter_caveat_and_gpu_reports_do_not(tmp_path, capsys):
    for run_dir in (SMOKE, E2E_H100):
        assert render(tmp_path, run_dir, capsys)[0] == 0
    cpu_md, gpu_md = report_md(tmp_path, SMOKE), report_md(tmp_path, E2E_H100)
    assert "Triton interpreter" in cpu_md and "Triton interpreter" not in gpu_md
    # rows that say what they applied name the opt-sets the caveat is about
    run_dir = copy_run(tmp_path, SMOKE)
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    for row in rows:
        row["applied_optimizations"] = ["rms_norm", "rope"] if row["opt"] == "kernels" else []
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert render(tmp_path, run_dir, capsys)[0] == 0
    assert "Opt-sets that applied optimizations here: kernels." in report_md(tmp_path, run_dir)


def test_a_row_whose_tokens_per_s_contradicts_its_step_times_is_flagged(tmp_path, capsys):
    run_dir = copy_run(tmp_path, E2E_H100)
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    rows[1]["tokens_per_s"] *= 2
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert render(tmp_path, run_dir, capsys)[0] == 0
    assert "1 row(s) whose stored tokens/s disagrees" in report_md(tmp_path, run_dir)


def test_ratios_below_a_tenth_keep_two_significant_digits():
    assert _ratio_cell({"speedup": 0.0033}) == "0.0033×"
    cell = _ratio_cell({"speedup": 0.0033, "speedup_ci95_low": 0.0031, "speedup_ci95_high": 0.0036})
    assert cell == "0.0033× [0.0031, 0.0036]"
    assert _ratio_cell({"speedup": 1.234}) == "1.23×"


@pytest.fixture
def drawn(monkeypatch):
    """The figures plots.py would save, kept instead of written."""
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, stem, formats: figures.append(fig) or [stem])
    return figures


def _entry(opt, status="ok", **values):
    return {"opt": opt, "status": status, **values}


def test_speedup_bars_on_cpu_scale(drawn, tmp_path):
    """Interpreter-speed rows (0.0033x) beside ordinary ones: a log axis, labels that are not 0.00x, and an ok
    point without a speedup gets a note, not a bar."""
    entries = [
        _entry("baseline", speedup=1.0, speedup_note="reference"),
        _entry("kernels", speedup=0.0033, speedup_ci95_low=0.0031, speedup_ci95_high=0.0036),
        _entry("compile", speedup=0.8),
        _entry("liger", speedup_note="baseline oom"),
        _entry("full", status="error"),
    ]
    assert plots.speedup_bars(entries, "cpu", tmp_path / "s") == [tmp_path / "s"]
    ax = drawn[0].axes[0]
    texts = [t.get_text().strip() for t in ax.texts]
    assert ax.get_xscale() == "log" and "0.0033×" in texts and "0.80×" in texts
    assert not any(t.startswith("0.00×") for t in texts)
    assert "baseline oom" in texts and "error" in texts
    assert len([p for p in ax.patches if p.get_width() != 0]) == 2  # kernels and compile only
    # near 1 the axis stays linear
    plots.speedup_bars([_entry("a", speedup=0.9), _entry("b", speedup=1.3)], "gpu", tmp_path / "t")
    assert drawn[1].axes[0].get_xscale() == "linear"


def test_phase_and_memory_bars_leave_out_what_was_not_measured(drawn, tmp_path):
    """A row without phase times or memory figures (a fused loss timed as whole steps, a CPU row) gets no bar
    of zero: only measured points are drawn."""
    entries = [
        _entry("baseline", forward_ms=10.0, backward_ms=20.0, optimizer_ms=5.0, peak_allocated_bytes=2**30),
        _entry("unsloth"),
    ]
    plots.phase_bars(entries, "phases", tmp_path / "p")
    plots.memory_bars(entries, "memory", tmp_path / "m")
    for fig in drawn:
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["baseline"]
        assert all(p.get_width() > 0 for p in ax.patches)
