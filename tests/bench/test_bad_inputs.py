"""Bad input and faults, as a user meets them through `optkit bench`: for each, the exit code, no traceback,
one message that names the fix, and the finished rows of an earlier run byte for byte unchanged.

Most cases fail at compose time and start no process (a fake point runner records any start). The faults
that only a real process shows (a child that raises, hangs, is killed with -9; a sweep killed with -9) run
a tiny CPU point.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import psutil
import pytest

from optkit import cli
from optkit.bench import resume as resume_mod
from optkit.bench import runner
from optkit.config.compose import compose
from optkit.results import jsonl as rows_file
from optkit.results.rows import append_row, empty_row, identity_fields, read_rows

ROOT = Path(__file__).resolve().parents[2]
FAKE_ENV = {"gpu_name": None, "torch_version": "t", "transformers_version": "x", "git_sha": "abc1234"}
TINY = [
    "suite=smoke",
    "model=tiny_llama",
    "train.warmup_steps=1",
    "train.steps=1",
    "train.batch_size=1",
    "data.seq_len=8",
    "bench.progress=false",
]
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RESULTS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
REAL_RUN_ISOLATED = runner.run_isolated
SMALL_LLAMA = json.dumps(
    {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    }
)


def _row(point: List[str], run_id: str, repeat: int, status: str = "ok", error: Optional[str] = None) -> dict:
    from omegaconf import OmegaConf

    row = empty_row()
    row.update(identity_fields(OmegaConf.to_container(compose(point), resolve=True), point, run_id, repeat))
    row.update(status=status, error=error, device="cpu")
    if status == "ok":
        row.update(tokens_per_s=1000.0, step_ms=8.0, forward_ms=3.0, backward_ms=4.0, optimizer_ms=1.0)
    return row


class Sweep:
    """The results root of a test, holding run r1 of suite smoke with one finished point (baseline); the
    fake point runner's starts are recorded in ``started``."""

    def __init__(self, root: Path):
        self.root = root
        self.run = root / "cpu" / "smoke" / "r1"
        self.run.mkdir(parents=True)
        (self.run / "env.json").write_text(json.dumps(FAKE_ENV))
        append_row(self.run / "results.jsonl", _row([*TINY, "opt=baseline"], "r1", 0))
        self.finished = (self.run / "results.jsonl").read_bytes()
        self.started: List[List[str]] = []
        self.status, self.error = "ok", None
        self.stdout = ""

    def fake_point(self, point, run_id, repeats, timeout_s, point_cfg, run_dir=None, env=None):
        self.started.append(point)
        return [_row(point, run_id, r, self.status, self.error) for r in repeats]

    def rows(self) -> List[dict]:
        return read_rows(self.run / "results.jsonl")

    def assert_finished_rows_kept(self) -> None:
        data = (self.run / "results.jsonl").read_bytes()
        assert data.startswith(self.finished), "a finished row was lost or changed"


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("optkit.measure.env.capture_env", lambda *a, **k: dict(FAKE_ENV))
    monkeypatch.setattr(runner, "_cuda_available", lambda: False)
    monkeypatch.delenv("OPTKIT_DEBUG", raising=False)
    state = Sweep(tmp_path / "results")
    monkeypatch.setattr(runner, "run_isolated", state.fake_point)
    return state


def _optkit(sweep: Sweep, capsys, *args: str) -> tuple:
    """(exit code, stdout + stderr) of `optkit bench ARGS bench.results_dir=<the test's root>`."""
    code = cli.main(["bench", *args, f"bench.results_dir={sweep.root}"])
    out = capsys.readouterr()
    sweep.stdout = out.out
    return code, out.out + out.err


def _check(code, output, expected_code, *needles):
    assert code == expected_code, output
    assert "Traceback" not in output, output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"


# --------------------------------------------------------------------------- compose time: nothing starts


def _model_dir(tmp: Path, config: Optional[str] = SMALL_LLAMA, weights=True):
    path = tmp / "ckpt"
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(config)
    if weights:
        (path / "model.safetensors").write_bytes(b"\0" * 8)
    return path


@dataclass
class Case:
    args: List[str]
    needles: List[str]
    code: int = EXIT_USAGE
    setup: Optional[Callable[[Path], object]] = None  # returns what "{}" in args stands for
    tiny: bool = True  # add the tiny smoke point's overrides
    extra: List[str] = field(default_factory=list)


def _unreadable_config(tmp: Path) -> Path:
    path = _model_dir(tmp)
    (path / "config.json").chmod(0)
    return path


COMPOSE_CASES = {
    "unknown model": Case(["model=llama9"], ["tiny_llama", "llama3_8b"]),
    "unknown opt-set, closest named": Case(["opt=fulll"], ["did you mean full?"]),
    "unknown train preset": Case(["train=lorra"], ["did you mean lora?"]),
    "unknown data preset": Case(["data=packd"], ["did you mean packed?"]),
    "unknown suite": Case(["suite=smok"], ["did you mean smoke?"], tiny=False),
    "key typo": Case(["train.batchsize=2"], ["did you mean train.batch_size?"]),
    "+ on a schema group": Case(["+train.batchsize=2"], ["'+' cannot add", "train.batch_size"]),
    "+ on an existing key": Case(["+train.batch_size=2"], ["drop the '+'"]),
    "nested key typo": Case(["opt.kernels.rmsnorm=true"], ["did you mean opt.kernels.rms_norm?"]),
    "bench key typo": Case(["bench.resultsdir=x"], ["did you mean bench.results_dir?"]),
    "unknown group": Case(["foo.bar=1"], ["no config group 'foo'", "model, opt, train"]),
    "hydra key": Case(["hydra.run.dir=x"], ["no config group 'hydra'"]),
    "a group node given a value": Case(["opt.kernels=true"], ["opt.kernels.rms_norm=..."]),
    "deleting a key": Case(["~train.lr"], ["cannot be deleted", "train.lr=VALUE"]),
    "int expected": Case(["train.batch_size=abc"], ["train.batch_size expects an int, got 'abc'"]),
    "int given a float": Case(["train.steps=2.5"], ["train.steps expects an int"]),
    "float expected": Case(["train.lr=fast"], ["train.lr expects a float"]),
    "bool expected": Case(["data.packing=maybe"], ["data.packing expects a bool"]),
    "list expected": Case(["train.lora_targets=q_proj"], ["expects a list of str", "[a,b]"]),
    "bad grammar": Case(["train.batch_size=[1"], ["train.batch_size=[1"]),
    "batch 0": Case(["train.batch_size=0"], ["train.batch_size must be >= 1"]),
    "negative seq_len": Case(["data.seq_len=-1"], ["data.seq_len must be >= 1"]),
    "pad fraction 1.5": Case(["data.pad_fraction=1.5"], ["[0, 1)"]),
    "timeout 0": Case(["bench.timeout_s=0"], ["bench.timeout_s must be >= 1"]),
    "repeats 0": Case(["bench.repeats=0"], ["bench.repeats must be >= 1"]),
    "bad dtype": Case(["model.dtype=fp8"], ["bfloat16"]),
    "bad method": Case(["train.method=lorra"], ["qlora"]),
    "bad optimizer": Case(["train.optimizer=sgd"], ["paged_adamw_8bit"]),
    "bad checkpointing": Case(["train.checkpointing=yes"], ["offload_double_buffer"]),
    "bad device": Case(["bench.device=tpu"], ["auto, cuda, cpu"]),
    "bad retry": Case(["bench.retry=always"], ["none, failed"]),
    "bad suite kind": Case(["suite.kind=weird"], ["training"]),
    "seq_len beyond positions": Case(["model=llama3_8b", "data.seq_len=16384"], ["max_position_embeddings=8192"]),
    "zero layers": Case(["model.num_layers=0"], ["model.num_layers must be >= 1"]),
    "more layers than the model": Case(["model.num_layers=9"], ["at most 2"]),
    "model.path missing": Case(["model.path=/nonexistent/ckpt"], ["does not exist"]),
    "model.path a file": Case(["model.path={}"], ["is a file"], setup=lambda t: (t / "f").write_text("x") and t / "f"),
    "model.path empty dir": Case(["model.path={}"], ["no config.json"], setup=lambda t: _model_dir(t, None, False)),
    "corrupt config.json": Case(["model.path={}"], ["not valid JSON"], setup=lambda t: _model_dir(t, '{"model_')),
    "config.json not an object": Case(["model.path={}"], ["not supported"], setup=lambda t: _model_dir(t, "[1]")),
    "unsupported model_type": Case(
        ["model.path={}"], ["'bert' is not supported"], setup=lambda t: _model_dir(t, '{"model_type": "bert"}')
    ),
    "checkpoint without weights": Case(
        ["model.path={}"], ["holds no weights"], setup=lambda t: _model_dir(t, weights=False)
    ),
    "unreadable config.json": Case(["model.path={}"], ["fix its permissions"], setup=_unreadable_config),
    "checkpoint layers exceeded": Case(["model.path={}", "model.num_layers=5"], ["at most 2"], setup=_model_dir),
    "LoRA target typo": Case(["train.lora_targets=[q_prj,v_proj]"], ["did you mean q_proj?"]),
    "LoRA targets match nothing": Case(
        ["train.lora_targets=[gate_proj,up_proj]", "model=tiny_qwen3_moe"], ["names no module"]
    ),
    "expert LoRA on a dense model": Case(["train.lora_targets=[q_proj,experts]"], ["no MoE experts: drop it"]),
    "comma list outside an axis": Case(["train.batch_size=1,2"], ["comma list", "[a,b]"]),
    "comma list without a suite": Case(["model=tiny_llama,tiny_qwen3"], ["add suite=NAME"], tiny=False),
    "a bare word": Case(["smoke"], ["did you mean suite=smoke?"], tiny=False),
    "an unknown option": Case(["--fast"], ["unknown option --fast"], tiny=False),
    "GPU suite on a CPU machine": Case(["suite=e2e"], ["no CUDA GPU", "suite=smoke"], tiny=False),
    "bench.device=cuda on a CPU machine": Case(["bench.device=cuda"], ["bench.device=cpu"]),
    "resume of an unknown run": Case(["bench.resume=r2"], ["no such run", "newest last: r1"]),
    "a run id reused without resume": Case(["bench.run_id=r1"], ["already exists", "bench.resume=r1"]),
    "retry without resume": Case(["bench.retry=failed"], ["add bench.resume=<run-id>", "r1"]),
    "run id and resume disagree": Case(["bench.run_id=r9", "bench.resume=r1"], ["drop bench.run_id"]),
}


@pytest.mark.parametrize("name", list(COMPOSE_CASES))
def test_a_mistake_is_one_line_before_any_point_starts(name, sweep, tmp_path, capsys):
    case = COMPOSE_CASES[name]
    if case.setup is _unreadable_config and os.geteuid() == 0:
        pytest.skip("root reads any file")
    target = case.setup(tmp_path) if case.setup else None
    args = [a.replace("{}", str(target)) for a in case.args]
    code, output = _optkit(sweep, capsys, *((TINY if case.tiny else []) + args))
    _check(code, output, case.code, *case.needles)
    assert len(output.strip().splitlines()) == 1, output
    assert not sweep.started, "no point may start"
    sweep.assert_finished_rows_kept()


def test_debug_shows_the_traceback_a_mistake_otherwise_hides(sweep, capsys, monkeypatch):
    monkeypatch.setenv("OPTKIT_DEBUG", "1")
    code, output = _optkit(sweep, capsys, *TINY, "train.batchsize=2")
    assert code == EXIT_USAGE and "Traceback" in output and "did you mean train.batch_size?" in output


def test_help_lists_groups_keys_types_defaults_and_meanings(capsys):
    assert cli.main(["bench", "--help"]) == EXIT_OK
    text = capsys.readouterr().out
    for needle in ("model=", "tiny_llama*", "train.batch_size  int = 2", "rows per step", "bench.retry", "failed"):
        assert needle in text, needle
    assert max(map(len, text.splitlines())) <= 100
    assert cli.main(["bench", "-h", "data"]) == EXIT_OK
    only_data = capsys.readouterr().out
    assert "data.seq_len" in only_data and "train.batch_size" not in only_data


# --------------------------------------------------------------------------- results files


def test_results_dir_that_cannot_be_created_is_one_line(sweep, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = cli.main(["bench", *TINY, "opt=baseline", f"bench.results_dir={blocker}"])
    output = capsys.readouterr().err
    _check(code, output, EXIT_RESULTS, "bench.results_dir=")
    assert not sweep.started


@pytest.mark.parametrize("errno_code", [errno.EROFS, errno.EACCES])
def test_read_only_results_dir_is_one_line(errno_code, sweep, tmp_path, capsys, monkeypatch):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if errno_code == errno.EACCES and os.geteuid() != 0:
        read_only.chmod(0o500)
    else:  # a read-only mount (or root, whom permissions do not stop): the file system refuses
        real_mkdir = Path.mkdir

        def refuse(self, *args, **kwargs):
            if str(self).startswith(str(read_only)):
                raise OSError(errno_code, os.strerror(errno_code), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refuse)
    code = cli.main(["bench", *TINY, "opt=baseline", f"bench.results_dir={read_only}"])
    _check(code, capsys.readouterr().err, EXIT_RESULTS, "bench.results_dir=<a writable directory>")
    assert not sweep.started


def test_unreadable_results_file_on_resume_is_one_line(sweep, capsys, monkeypatch):
    real_open = open

    def unreadable(path, mode="r", *args, **kwargs):
        if "r" in mode and str(path).endswith("results.jsonl"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(rows_file, "open", unreadable, raising=False)
    code, output = _optkit(sweep, capsys, *TINY, "opt=baseline,kernels", "bench.resume=r1")
    _check(code, output, EXIT_RESULTS, "Permission denied", "permissions")
    assert not sweep.started
    sweep.assert_finished_rows_kept()


class _FullDisk:
    """A file whose write stores half the bytes, then fails as a full disk does."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()

    def write(self, data):
        self.real.write(data[: len(data) // 2])
        self.real.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_appending_keeps_earlier_rows_and_the_next_row_whole(sweep, capsys, monkeypatch):
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return _FullDisk(handle) if "a" in mode else handle

    monkeypatch.setattr(rows_file, "open", full_disk_open, raising=False)
    code, output = _optkit(sweep, capsys, *TINY, "opt=baseline,kernels", "bench.resume=r1")
    _check(code, output, EXIT_RESULTS, "No space left on device", "free disk space")
    sweep.assert_finished_rows_kept()
    monkeypatch.undo()  # the disk has room again: resume, and the torn half-row is reported, never glued
    monkeypatch.setattr("optkit.measure.env.capture_env", lambda *a, **k: dict(FAKE_ENV))
    monkeypatch.setattr(runner, "_cuda_available", lambda: False)
    monkeypatch.setattr(runner, "run_isolated", sweep.fake_point)
    code, output = _optkit(sweep, capsys, *TINY, "opt=baseline,kernels", "bench.resume=r1")
    _check(code, output, EXIT_OK, "skipped 1 line(s)", "line 2 (torn")
    assert [r["opt"] for r in sweep.rows()] == ["baseline", "kernels"]
    sweep.assert_finished_rows_kept()


@pytest.mark.parametrize("garbage", [b'{"opt": "kernels", "status": "o', b"[1, 2, 3]", b"\xff\xfe not text"])
def test_a_torn_or_foreign_line_is_named_and_skipped_on_resume(garbage, sweep, capsys):
    with open(sweep.run / "results.jsonl", "ab") as fh:
        fh.write(garbage)  # no newline: a writer killed mid-line
    code, output = _optkit(sweep, capsys, *TINY, "opt=baseline,kernels", "bench.resume=r1")
    _check(code, output, EXIT_OK, "skipped 1 line(s)", "line 2 (")
    assert len(sweep.started) == 1 and "opt=kernels" in sweep.started[0], "the finished baseline is not redone"
    assert [r["opt"] for r in sweep.rows()] == ["baseline", "kernels"]
    sweep.assert_finished_rows_kept()


@pytest.mark.parametrize("content", ["{not json", "[]", ""])
def test_corrupt_env_json_on_resume_is_rewritten_with_a_warning(content, sweep, capsys):
    (sweep.run / "env.json").write_text(content)
    code, output = _optkit(sweep, capsys, *TINY, "opt=baseline,kernels", "bench.resume=r1")
    _check(code, output, EXIT_OK, "env.json", "writing this machine's environment")
    assert json.loads((sweep.run / "env.json").read_text())["git_sha"] == "abc1234"
    sweep.assert_finished_rows_kept()


# --------------------------------------------------------------------------- exit codes and causes


@pytest.mark.parametrize(
    "status,error,code",
    [
        ("ok", None, EXIT_OK),
        ("oom", "OutOfMemoryError: CUDA out of memory", EXIT_OK),
        ("skipped", "liger-kernel is not installed: pip install liger-kernel", EXIT_OK),
        ("error", "Traceback (most recent call last):\n  File x\nValueError: the real cause", EXIT_FAILED),
        ("timeout", "point exceeded bench.timeout_s=5 and was killed", EXIT_FAILED),
    ],
)
def test_exit_code_follows_the_worst_point_and_names_the_cause(status, error, code, sweep, capsys):
    sweep.status, sweep.error = status, error
    code_seen, output = _optkit(sweep, capsys, *TINY, "opt=kernels,full")
    _check(code_seen, output, code)
    if code == EXIT_FAILED:
        cause = error.splitlines()[-1]
        assert f"2 point(s) failed:\n  2 x {status}: {cause}" in output
        assert "bench.retry=failed" in output
    if status != "ok":
        assert f"[1] {status}: {(error or '').splitlines()[-1]}" in output, "the reason, below the table"
    assert max(len(line) for line in sweep.stdout.splitlines()) <= 100, sweep.stdout


def test_retry_failed_measures_error_rows_again_and_keeps_them(sweep, capsys):
    sweep.status, sweep.error = "error", "ValueError: flaky"
    assert _optkit(sweep, capsys, *TINY, "opt=kernels", "bench.run_id=r2")[0] == EXIT_FAILED
    sweep.status, sweep.error, sweep.started[:] = "ok", None, []
    code, output = _optkit(sweep, capsys, *TINY, "opt=kernels", "bench.resume=r2")
    assert code == EXIT_FAILED and not sweep.started, "without retry an error row is an answer"
    code, output = _optkit(sweep, capsys, *TINY, "opt=kernels", "bench.resume=r2", "bench.retry=failed")
    _check(code, output, EXIT_OK)
    assert len(sweep.started) == 1
    rows = read_rows(sweep.root / "cpu" / "smoke" / "r2" / "results.jsonl")
    assert [r["status"] for r in rows] == ["error", "ok"], "append-only: the error row stays"
    assert "[1]" not in output, "the summary shows the newest row"


def test_a_sweep_killed_before_its_first_row_resumes_from_the_start(sweep, capsys):
    killed = sweep.root / "cpu" / "smoke" / "r3"
    killed.mkdir()
    (killed / "env.json").write_text(json.dumps(FAKE_ENV))  # what a sweep writes before its first point
    code, output = _optkit(sweep, capsys, *TINY, "opt=baseline,kernels", "bench.resume=r3")
    _check(code, output, EXIT_OK)
    assert len(sweep.started) == 2 and len(read_rows(killed / "results.jsonl")) == 2
    sweep.assert_finished_rows_kept()


def test_interrupt_exits_130_and_says_how_to_resume(sweep, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_isolated", interrupted)
    code, output = _optkit(sweep, capsys, *TINY, "opt=baseline,kernels", "bench.resume=r1")
    _check(code, output, EXIT_INTERRUPTED, "bench.resume=r1")
    sweep.assert_finished_rows_kept()


def test_nvml_unavailable_leaves_gpu_facts_empty_not_a_traceback(monkeypatch, capsys):
    import types

    from optkit.measure import nvml

    broken = types.SimpleNamespace(
        nvmlInit=lambda: (_ for _ in ()).throw(RuntimeError("NVML Shared Library Not Found"))
    )
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert nvml.query_once(0, lambda *a: 1) is None
    sampler = nvml.NvmlSampler(device_index=0, interval_ms=5.0)
    sampler.start()
    report = sampler.stop().to_dict()
    assert report["available"] is False and "NVML" in str(report.get("reason"))
    assert cli.main(["env"]) == EXIT_OK
    output = capsys.readouterr()
    assert "Traceback" not in output.out + output.err and json.loads(output.out)["peft_version"]


def test_list_into_a_closed_pipe_ends_quietly():
    proc = subprocess.run(
        f"{sys.executable} -m optkit list | head -2", shell=True, capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert len(proc.stdout.splitlines()) == 2 and "Traceback" not in proc.stderr and "Broken" not in proc.stderr


def test_stale_scratch_of_a_dead_sweep_is_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / f"optkit-point-{dead.pid}-x", tmp_path / f"optkit-point-{os.getpid()}-y"
    stale.mkdir(), live.mkdir()
    assert resume_mod.clean_stale_scratch(tmp_path) == [stale] and live.exists()


def test_a_child_killed_while_writing_its_rows_is_an_error_row(sweep, monkeypatch):
    from optkit.bench.process import Finished

    def torn_write(cmd, env, timeout_s):
        Path(cmd[cmd.index("--out") + 1]).write_text('[{"status": "ok", "tok')
        return Finished(-signal.SIGKILL, "")

    monkeypatch.setattr(runner, "run_process", torn_write)
    point = [*TINY, "opt=baseline"]
    (row,) = REAL_RUN_ISOLATED(point, "r1", [0], 5, compose(point), env=FAKE_ENV)
    assert row["status"] == "error" and row["error"].startswith("killed by SIGKILL")
    assert row["torch"] == "t", "a failed row carries the versions too"


# --------------------------------------------------------------------------- real processes


def _point_processes(pid: int) -> List[psutil.Process]:
    """The point processes below ``pid`` (not, say, the git calls that capture the environment)."""
    found = []
    try:
        for proc in psutil.Process(pid).children(recursive=True):
            if "optkit.bench.point" in " ".join(proc.cmdline()):
                found.append(proc)
    except psutil.Error:
        pass
    return found


def _wait_for(predicate, timeout_s: float = 60.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def _real_sweep(sweep, monkeypatch, capsys, *args):
    monkeypatch.setattr(runner, "run_isolated", REAL_RUN_ISOLATED)
    return _optkit(sweep, capsys, *TINY, *args)


def test_a_point_that_raises_reports_the_exception_not_traceback(sweep, tmp_path, capsys, monkeypatch):
    ckpt = _model_dir(tmp_path)  # passes every check, but its weights file is not a safetensors file
    code, output = _real_sweep(sweep, monkeypatch, capsys, "opt=baseline", f"model.path={ckpt}", "bench.run_id=r2")
    (row,) = read_rows(sweep.root / "cpu" / "smoke" / "r2" / "results.jsonl")
    assert code == EXIT_FAILED and row["status"] == "error"
    reason = row["error"].splitlines()[0]
    assert not reason.startswith("Traceback") and ("Error" in reason or "Exception" in reason), reason
    assert f"1 x error: {reason}" in output and "Traceback" not in output


def test_a_point_that_hangs_past_its_timeout_is_killed(sweep, capsys, monkeypatch):
    monkeypatch.setenv("OPTKIT_INJECT_FAULT", "hang@tiny_llama")
    started = time.time()
    code, output = _real_sweep(sweep, monkeypatch, capsys, "opt=kernels", "bench.resume=r1", "bench.timeout_s=3")
    assert time.time() - started < 60
    _check(code, output, EXIT_FAILED, "1 x timeout: point exceeded bench.timeout_s=3")
    assert [r["status"] for r in sweep.rows()] == ["ok", "timeout"]
    sweep.assert_finished_rows_kept()


def test_a_point_killed_with_sigkill_is_an_error_row_and_the_sweep_goes_on(sweep, capsys, monkeypatch):
    monkeypatch.setenv("OPTKIT_INJECT_FAULT", "hang@tiny_llama")

    def kill_the_point():
        child = _wait_for(lambda: _point_processes(os.getpid()))[0]
        time.sleep(0.5)
        child.kill()

    killer = threading.Thread(target=kill_the_point, daemon=True)
    killer.start()
    code, output = _real_sweep(sweep, monkeypatch, capsys, "opt=kernels", "bench.resume=r1")
    killer.join(5)
    _check(code, output, EXIT_FAILED, "1 x error: killed by SIGKILL")
    assert [r["status"] for r in sweep.rows()] == ["ok", "error"]
    sweep.assert_finished_rows_kept()


def test_a_sweep_killed_with_sigkill_takes_its_point_along_and_resumes(sweep, capsys, monkeypatch):
    from optkit.measure.env import capture_env, gpu_slug

    env = dict(os.environ, OPTKIT_INJECT_FAULT="hang@tiny_llama")
    slug = gpu_slug(capture_env())
    results = sweep.root / slug / "smoke" / "r1"
    if slug != "cpu":
        results.parent.mkdir(parents=True, exist_ok=True)
        sweep.run.rename(results)
        sweep.run = results
    cmd = [sys.executable, "-m", "optkit", "bench", *TINY, "opt=baseline,kernels", "bench.resume=r1"]
    parent = subprocess.Popen(
        [*cmd, f"bench.results_dir={sweep.root}"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    child = _wait_for(lambda: _point_processes(parent.pid), timeout_s=120)[0]
    parent.kill()
    _, stderr = parent.communicate(timeout=30)
    assert "Traceback" not in stderr
    try:
        _wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, timeout_s=10)
    finally:  # never leave a hanging point behind, even when the check fails
        if child.is_running():
            child.kill()
    sweep.assert_finished_rows_kept()
    scratch = Path(resume_mod.tempfile.gettempdir())
    assert list(scratch.glob(f"optkit-point-{parent.pid}-*")), "a sweep killed with -9 cannot clean up itself"
    resume_mod.clean_stale_scratch()
    assert not list(scratch.glob(f"optkit-point-{parent.pid}-*")), "the next sweep removes it"
    sweep.started.clear()  # resume (the fake point runner): only the point in flight is measured
    monkeypatch.setattr("optkit.measure.env.capture_env", lambda *a, **k: dict(FAKE_ENV, gpu_name=None))
    if slug == "cpu":
        code, output = _optkit(sweep, capsys, *TINY, "opt=baseline,kernels", "bench.resume=r1")
        _check(code, output, EXIT_OK)
        assert len(sweep.started) == 1 and "opt=kernels" in sweep.started[0]
        assert [r["opt"] for r in sweep.rows()] == ["baseline", "kernels"]
    sweep.assert_finished_rows_kept()
