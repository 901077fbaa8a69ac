"""The `optkit` command as a user runs it: ``python -m optkit ...`` in a fresh process (argument parsing,
dispatch to each subcommand, exit codes, output streams), on the committed golden runs under tests/golden."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
SMOKE = GOLDEN / "cpu/smoke/golden-smoke"
E2E_H100 = GOLDEN / "h100/e2e/golden-e2e-h100"


def optkit(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OPTKIT_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-m", "optkit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def test_no_arguments_prints_the_commands():
    result = optkit()
    assert result.returncode == 0
    for command in ("bench", "report", "regress", "env", "list"):
        assert f"\n  {command} " in result.stdout


def test_an_unknown_command_is_exit_2_naming_the_commands():
    result = optkit("benhc")
    assert result.returncode == 2 and "unknown command 'benhc'" in result.stderr and "bench" in result.stderr


def test_env_prints_the_environment_rows_are_stamped_with():
    import torch

    result = optkit("env")
    assert result.returncode == 0
    env = json.loads(result.stdout)
    assert env["torch_version"] == torch.__version__
    assert {"git_sha", "python_version", "gpu_name", "transformers_version"} <= set(env)


def test_report_dispatch_writes_the_report(tmp_path):
    result = optkit("report", str(SMOKE), "--out", str(tmp_path), "--formats", "")
    assert result.returncode == 0
    report_md = tmp_path / "cpu" / "smoke" / "report.md"
    assert result.stdout.strip().splitlines()[-1] == str(report_md)
    assert "Triton interpreter" in report_md.read_text()


def test_report_of_a_directory_without_runs_is_one_line_exit_2(tmp_path):
    result = optkit("report", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no results.jsonl" in result.stderr


def test_regress_dispatch_and_its_exit_codes(tmp_path):
    candidate = tmp_path / "h100" / "e2e" / "candidate"
    shutil.copytree(E2E_H100, candidate)
    same = optkit("regress", "--baseline", str(E2E_H100), "--candidate", str(candidate))
    assert same.returncode == 0 and same.stdout.startswith("# optkit regress: OK")

    lines = (candidate / "results.jsonl").read_text().splitlines()
    (candidate / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:120])  # killed mid-write
    torn = optkit("regress", "--baseline", str(E2E_H100), "--candidate", str(candidate))
    fails = [line for line in torn.stderr.splitlines() if line.startswith("optkit regress: FAIL:")]
    assert torn.returncode == 1 and len(fails) == 2  # the torn line, and the point it held now missing
    allowed = optkit(
        "regress", "--baseline", str(E2E_H100), "--candidate", str(candidate), "--allow-missing", "--allow-bad-lines"
    )
    assert allowed.returncode == 0

    unusable = optkit("regress", "--baseline", str(E2E_H100), "--candidate", str(tmp_path / "nothing"))
    assert unusable.returncode == 2 and unusable.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [["regress"], ["report"]])
def test_missing_arguments_are_usage_errors(args):
    result = optkit(*args)
    assert result.returncode == 2 and "usage: optkit" in result.stderr
