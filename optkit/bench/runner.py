"""Expand a suite into points, run each in its own subprocess, append rows, resume, summarize.

Why a subprocess per point: a fresh CUDA context (an OOM or a sticky CUDA error cannot poison the
next point, allocator peaks start clean) and patched modules can never leak between points.
Hydra's own multirun launcher runs jobs in one process, which is exactly what we avoid.

``bench.repeats=R`` measures R windows per point: back to back in one process after one warm-up
(default), or one process each with ``bench.isolate_repeats=true`` (process-to-process spread: a
new CUDA context, allocator and autotuning each time). Resume skips every (config_hash, repeat)
already in results.jsonl and measures only the missing windows (bench/resume.py: which run, what is done).

Everything that can be checked before a point runs is checked before the first one starts (config keys and
values, checkpoint paths, LoRA targets, a suite's GPU requirement): a mistake is one message, not N rows.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from optkit.bench.launch import failure_cause, point_command, rank_failure_rows, skip_reason, visible_gpus
from optkit.bench.point_process import point_env, with_entry_module
from optkit.bench.process import exit_cause, run_process
from optkit.bench.progress import Progress
from optkit.bench.resume import (
    choose_run_dir,
    clean_stale_scratch,
    default_run_id,
    done_windows,
    prepare_run_dir,
    scratch_prefix,
)
from optkit.bench.schedule import suite_bench_overrides, window_jobs
from optkit.config.compose import ConfigError
from optkit.results.rows import append_row, empty_row, env_stamp, read_rows

AXIS_ABLATION = "ablation"
STDERR_TAIL_CHARS = 4000
POINT_GROUPS = ("model", "opt", "train", "data")


# --------------------------------------------------------------------------- expansion


def split_overrides(overrides: Sequence[str]) -> tuple[Optional[str], List[str]]:
    """(suite name or None, the other overrides)."""
    suite, rest = None, []
    for item in overrides:
        if item.startswith("suite="):
            suite = item.split("=", 1)[1]
        else:
            rest.append(item)
    return suite, rest


def expand_points(suite_cfg, user_overrides: Sequence[str], family_of_model=None) -> List[List[str]]:
    """The override list of every point of a suite.

    Precedence, last wins: suite ``fixed`` < suite ``axes`` value < the user's own overrides. A user
    override of an axis key replaces that axis (``model=llama3_8b`` sweeps only that model);
    a comma list (``opt=baseline,full``) becomes the axis.
    """
    from omegaconf import OmegaConf

    axes = {k: list(v) for k, v in OmegaConf.to_container(suite_cfg.axes, resolve=True).items()}
    fixed = OmegaConf.to_container(suite_cfg.fixed, resolve=True)
    user = list(user_overrides)
    for item in list(user):
        key, _, value = item.partition("=")
        if key in axes:
            axes[key] = value.split(",")
            user.remove(item)
    base = [f"suite={suite_cfg.name}"] + [f"{k}={_fmt(v)}" for k, v in fixed.items()]
    keys = list(axes)
    explicit = OmegaConf.to_container(suite_cfg.points, resolve=True)
    points: List[List[str]] = []
    grid = itertools.product(*(axes[k] for k in keys)) if (keys or not explicit) else ()
    for values in grid:
        chosen = dict(zip(keys, values))
        if chosen.get("opt") == AXIS_ABLATION:
            points.extend(
                base + _axis_overrides(chosen, skip="opt") + opt + user
                for opt in ablation_opt_overrides(chosen.get("model"), family_of_model)
            )
            continue
        points.append(base + _axis_overrides(chosen) + user)
    points.extend(base + [f"{k}={_fmt(v)}" for k, v in p.items()] + user for p in explicit)
    return points


def _axis_overrides(chosen: Dict[str, Any], skip: Optional[str] = None) -> List[str]:
    return [f"{k}={_fmt(v)}" for k, v in chosen.items() if k != skip]


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)


def ablation_opt_overrides(model_name: Optional[str], family_of_model=None) -> List[List[str]]:
    """baseline, full, each optimization alone on (only_<name>) and alone off (full_minus_<name>); one that
    opt=full leaves off (measured slower, or for long sequences only) is added to full instead (full_plus_<name>)."""
    from optkit.config.compose import compose
    from optkit.opt.registry import REGISTRY, switch_value

    full = compose(["opt=full"]).opt

    family = family_of_model(model_name) if (family_of_model and model_name) else None
    names = [
        n
        for n, o in REGISTRY.items()
        if not o.peer
        and (family is None or o.families is None or family in o.families)
        and _applies_to_family(o, family)
    ]
    sets = [["opt=baseline"], ["opt=full"]]
    for name in names:
        key = REGISTRY[name].config_key
        sets.append(["opt=baseline", f"opt.name=only_{name}", f"opt.{key}=true"])
    for name in names:
        key = REGISTRY[name].config_key
        if switch_value(full, key):
            sets.append(["opt=full", f"opt.name=full_minus_{name}", f"opt.{key}=false"])
        else:
            sets.append(["opt=full", f"opt.name=full_plus_{name}", f"opt.{key}=true"])
    return sets


def _applies_to_family(opt, family: Optional[str]) -> bool:
    """MoE-only optimizations are not ablated on dense models (their row would equal baseline)."""
    if family is None:
        return True
    from optkit.families import get_family

    if "moe" in opt.requires and not get_family(family).moe:
        return False
    return "packing" not in opt.requires  # needs data.packing: ablated in its own suite


def model_family(model_name: str) -> Optional[str]:
    from omegaconf import OmegaConf

    from optkit.config.compose import CONF_DIR

    path = CONF_DIR / "model" / f"{model_name}.yaml"
    return OmegaConf.load(path).get("family") if path.exists() else None


# --------------------------------------------------------------------------- running


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def default_suite() -> str:
    return "e2e" if _cuda_available() else "smoke"


def run_sweep(overrides: Sequence[str]) -> Path:
    """Run a suite (or a single point when no suite is given); returns the run directory."""
    from optkit.config.checks import check_point
    from optkit.config.compose import compose
    from optkit.measure.env import capture_env, gpu_slug

    suite_name, rest = split_overrides(overrides)
    if suite_name is None:  # point overrides alone mean one point; otherwise the default suite
        defines_point = any(o.split("=", 1)[0].split(".")[0].lstrip("+~") in POINT_GROUPS for o in rest)
        suite_name = "none" if defines_point else default_suite()
    # The sweep-level config: the suite and bench settings (axis values may be comma lists here); a suite's
    # fixed bench.* entries are its defaults, the user's bench.* overrides win.
    user_bench = [o for o in rest if o.startswith("bench.")]
    cfg = compose([f"suite={suite_name}", *suite_bench_overrides(suite_name), *user_bench])
    _check_device(cfg)
    points = expand_points(cfg.suite, rest, model_family) if suite_name != "none" else [["suite=none", *rest]]
    point_cfgs = [compose(p) for p in points]  # fail fast, before any work, on a bad name or value
    for point_cfg in point_cfgs:
        check_point(point_cfg)
    env = capture_env()
    suite_dir = Path(cfg.bench.results_dir) / gpu_slug(env) / suite_name
    run_dir, resuming = choose_run_dir(
        cfg.bench, suite_dir, lambda: default_run_id(suite_dir, suite_name, env.get("git_sha"))
    )
    run_id = run_dir.name
    clean_stale_scratch()
    prepare_run_dir(run_dir, env, resuming, _log)

    if cfg.suite.kind == "kernels":
        _run_kernels_suite(point_cfgs[0], run_dir)
        return run_dir
    if cfg.suite.kind == "fit":
        _run_fit_suite(cfg, rest, run_dir, env, resuming)
        return run_dir
    results = run_dir / "results.jsonl"
    done = done_windows(read_rows(results), cfg.bench.retry) if resuming else set()
    _log(f"optkit: {len(points)} point(s) x {cfg.bench.repeats} repeat(s) -> {run_dir}")
    progress = Progress(len(points) * cfg.bench.repeats, enabled=cfg.bench.progress)
    try:
        _measure(points, point_cfgs, cfg, done, run_dir, env, progress)
    except KeyboardInterrupt:
        _log(f"optkit: interrupted; the finished points are in {results}: bench.resume={run_id} measures the rest")
        raise
    from optkit.bench.summary import failure_lines, print_summary

    rows = read_rows(results)
    print_summary(rows, baseline_opt=cfg.suite.baseline_opt)
    _log(f"results: {results}")
    failures = failure_lines(rows)
    for line in failures:
        _log(line)
    if failures:
        _log(f"  (bench.resume={run_id} bench.retry=failed measures them again)")
    return run_dir


def _check_device(cfg) -> None:
    """A suite or device that needs a GPU, refused once on a machine without one (not once per point)."""
    if _cuda_available():
        return
    if cfg.suite.requires_cuda:
        raise ConfigError(
            f"suite {cfg.suite.name!r} measures a GPU and this machine has no CUDA GPU: run it on a GPU machine, "
            "or suite=smoke here"
        )
    if cfg.bench.device == "cuda":
        raise ConfigError("bench.device=cuda but no CUDA GPU is visible: drop bench.device, or pass bench.device=cpu")


def _measure(points, point_cfgs, cfg, done, run_dir: Path, env, progress: Progress) -> None:
    results, run_id = run_dir / "results.jsonl", run_dir.name
    todo_by_point = []
    for point, point_cfg in zip(points, point_cfgs):
        point_hash = _hash_of(point_cfg)
        todo_by_point.append([r for r in range(cfg.bench.repeats) if (point_hash, r) not in done])
        for _ in range(cfg.bench.repeats - len(todo_by_point[-1])):
            progress.skip(f"{_label(point)} (done)")
    # One process per point (its windows back to back), one per window, or one per window in rounds.
    for index, repeats in window_jobs(todo_by_point, cfg.bench.isolate_repeats, cfg.bench.interleave):
        point, point_cfg = points[index], point_cfgs[index]
        progress.start(_label(point))
        rows = run_isolated(
            point, run_id, repeats, timeout_s=cfg.bench.timeout_s, point_cfg=point_cfg, run_dir=run_dir, env=env
        )
        for row in rows:
            append_row(results, row)
        progress.finish(rows)


def _hash_of(cfg) -> str:
    from optkit.results.rows import config_hash

    return config_hash(_container(cfg))


def run_isolated(
    point: List[str],
    run_id: str,
    repeats: Sequence[int],
    timeout_s: float,
    point_cfg,
    run_dir: Optional[Path] = None,
    env: Optional[Dict[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """Run one point in a fresh Python process, one measurement window per index in ``repeats``;
    always returns one row per index (failure rows, carrying ``env``'s versions, when the process died).

    The process is handed the composed, resolved config (``point_cfg``) in a file, not overrides to compose
    again: what the runner checked is exactly what the point runs."""
    with tempfile.TemporaryDirectory(prefix=scratch_prefix("point")) as tmp:
        out, config = Path(tmp) / "rows.json", Path(tmp) / "point.json"
        config.write_text(json.dumps({"config": _container(point_cfg), "overrides": list(point)}))
        unlaunchable = skip_reason(_container(point_cfg), visible_gpus())
        if unlaunchable:
            return [_failed_row(point, run_id, r, "skipped", unlaunchable, "", point_cfg, env) for r in repeats]
        point_args = ["--config", str(config), "--out", str(out), "--run-id", run_id, "--repeats"]
        point_args += [",".join(map(str, repeats)), *(["--run-dir", str(Path(run_dir).resolve())] if run_dir else [])]
        cmd = point_command(_container(point_cfg), point_args)  # one process, or torchrun's bench.gpus
        cmd = with_entry_module(cmd, _container(point_cfg))  # opt.unsloth: a process that imports unsloth first
        # every point: the sweep's allocator config (bench.alloc_conf); unsloth: its offline variables
        process_env = point_env(_container(point_cfg), dict(os.environ, PYTHONUNBUFFERED="1"))
        if not _cuda_available():  # no GPU: optkit's Triton kernels run under Triton's interpreter
            process_env.setdefault("TRITON_INTERPRET", "1")
        finished = run_process(cmd, process_env, timeout_s)
        rows = None
        if finished.returncode is not None:  # a point of several processes: a failed rank wrote its rows
            rows = _rows_written(out) or rank_failure_rows(out, finished.stderr)  # (optkit/bench/launch.py)
    if rows is not None:
        return rows
    if finished.returncode is None:
        status, cause = "timeout", f"point exceeded bench.timeout_s={timeout_s} and was killed"
    else:
        status = "oom" if "out of memory" in finished.stderr.lower() else "error"
        cause = failure_cause(finished.stderr) or exit_cause(finished.returncode, finished.stderr)
        cause += f"\npoint process exited with code {finished.returncode}"
    return [_failed_row(point, run_id, r, status, cause, finished.stderr, point_cfg, env) for r in repeats]


def _rows_written(out: Path) -> Optional[List[Dict[str, Any]]]:
    """The rows the point process wrote; None when it wrote none (or died while writing them)."""
    try:
        rows = json.loads(out.read_text())
    except (OSError, ValueError):
        return None
    return rows if isinstance(rows, list) and all(isinstance(r, dict) for r in rows) else None


def _container(cfg) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _failed_row(point, run_id, repeat, status, message, stderr, point_cfg, env=None) -> Dict[str, Any]:
    """A row for a point whose process died without writing one (crash, kill, timeout). Its error's first line
    is the cause (the exception the process ended with, or the signal that killed it)."""
    from optkit.results.rows import identity_fields

    row = empty_row()
    row.update(identity_fields(_container(point_cfg), point, run_id, repeat))
    if env is not None:
        row.update(env_stamp(env))
    row.update(
        run_id=run_id,
        repeat=repeat,
        overrides=list(point),
        status=status,
        error=f"{message}\n--- stderr tail ---\n{stderr[-STDERR_TAIL_CHARS:]}",
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return row


def _run_kernels_suite(cfg, run_dir: Path) -> None:
    """A suite of kind "kernels" measures ops, not training steps: its own module, in a subprocess too."""
    with tempfile.TemporaryDirectory(prefix=scratch_prefix("kernels")) as tmp:
        config = Path(tmp) / "suite.json"
        config.write_text(json.dumps({"config": _container(cfg)}))
        proc = subprocess.run(
            [sys.executable, "-m", "optkit.bench.kernels.run", "--run-dir", str(run_dir), "--config", str(config)]
        )
    if proc.returncode != 0:
        _log(f"kernels suite exited with code {proc.returncode}; rows written so far are in {run_dir}")


def _run_fit_suite(cfg, user_overrides: Sequence[str], run_dir: Path, env, resuming: bool) -> None:
    """A suite of kind "fit" bisects, per stack and card, for the largest point that fits (bench/fit.py); each
    probe is a point run as any other (run_isolated: its own process) and its row. Resuming replays the
    recorded probes and measures only the rest."""
    from optkit.bench.fit import fit_cells, recorded_measure, run_fit_suite
    from optkit.config.checks import check_point
    from optkit.config.compose import compose

    results = run_dir / "results.jsonl"
    cells = fit_cells(cfg.suite, user_overrides, expand_points)
    for cell in cells:
        check_point(compose(cell))

    def run_probe(point: List[str], point_cfg) -> List[Dict[str, Any]]:
        return run_isolated(point, run_dir.name, [0], cfg.bench.timeout_s, point_cfg, run_dir=run_dir, env=env)

    earlier = read_rows(results) if resuming else []
    measure = recorded_measure(run_probe, _container, lambda row: append_row(results, row), earlier)
    _log(f"optkit: fit search over {len(cells)} cell(s) -> {run_dir}")
    run_fit_suite(cells, compose, measure, _log)
    _log(f"results: {results} (optkit report {run_dir} tabulates the answers)")


def _label(point: List[str]) -> str:
    hidden = ("suite=", "train.warmup_steps", "train.steps", "bench.results_dir", "bench.resume", "bench.retry")
    hidden += ("bench.repeats", "bench.isolate_repeats", "bench.interleave")  # a suite's sweep settings
    return " ".join(p for p in point if not p.startswith(hidden))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
