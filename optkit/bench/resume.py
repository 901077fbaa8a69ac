"""Which run directory a sweep writes to, which of its points are already done, and what a killed sweep
left behind.

A run is ``<results_dir>/<gpu>/<suite>/<run_id>/``. A new run gets a new directory (an existing run id is
refused: appending a second sweep to it would put duplicates beside the first one's rows); ``bench.resume``
names an existing run and measures only the (point, window) pairs it has no row for; with
``bench.retry=failed`` rows of status error or timeout do not count as done, so those points are measured
again (their old rows stay: the file is append-only, and the newest row of a point is its result).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from optkit.config.compose import ConfigError
from optkit.results.rows import write_error

RETRIED_STATUSES = ("error", "timeout")  # bench.retry=failed measures these again; oom and skipped are answers
SCRATCH_PREFIXES = ("optkit-point-", "optkit-kernels-")


def existing_runs(suite_dir: Path) -> List[str]:
    """Run ids under a suite directory, oldest first."""
    if not suite_dir.is_dir():
        return []
    runs = [p for p in suite_dir.iterdir() if p.is_dir()]
    return [p.name for p in sorted(runs, key=lambda p: (p.stat().st_mtime, p.name))]


def _runs_listing(suite_dir: Path) -> str:
    runs = existing_runs(suite_dir)
    if not runs:
        return f"there is no run under {suite_dir} yet"
    shown = runs[-10:]
    more = f" (and {len(runs) - len(shown)} older)" if len(runs) > len(shown) else ""
    return f"runs under {suite_dir}, newest last: {', '.join(shown)}{more}"


def choose_run_dir(bench, suite_dir: Path, new_run_id) -> Tuple[Path, bool]:
    """(the run directory, whether it resumes an existing run); ``new_run_id()`` names a new run.
    Every refusal is a ConfigError that says what to pass instead."""
    resume, run_id, retry = bench.resume, bench.run_id, bench.retry
    if retry != "none" and not resume:
        raise ConfigError(
            f"bench.retry={retry} measures a run's failed points again: add bench.resume=<run-id>; "
            + _runs_listing(suite_dir)
        )
    if resume:
        if run_id and run_id != resume:
            raise ConfigError(f"bench.run_id={run_id} and bench.resume={resume} name two runs: drop bench.run_id")
        if not (suite_dir / resume).is_dir():
            raise ConfigError(f"bench.resume={resume}: no such run; {_runs_listing(suite_dir)}")
        return suite_dir / resume, True
    if run_id:
        run_dir = suite_dir / run_id
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(
                f"bench.run_id={run_id} already exists ({run_dir}): add bench.resume={run_id} to finish it, "
                "or choose another run id"
            )
        return run_dir, False
    return suite_dir / new_run_id(), False


def default_run_id(suite_dir: Path, suite_name: str, git_sha: Optional[str]) -> str:
    """``<suite>-<yyyymmdd>-<sha7>``: what ran, when and at which commit; ``-2``, ``-3`` ... for a repeat."""
    stem = f"{suite_name}-{datetime.now(timezone.utc):%Y%m%d}-{(git_sha or 'nosha')[:7]}"
    run_id, n = stem, 1
    while (suite_dir / run_id).exists():
        n += 1
        run_id = f"{stem}-{n}"
    return run_id


def done_windows(rows: Iterable[Dict[str, Any]], retry: str) -> Set[Tuple[Any, Any]]:
    """(config_hash, repeat) of every window the run has an answer for."""
    done = set()
    for row in rows:
        if retry == "failed" and row.get("status") in RETRIED_STATUSES:
            continue
        done.add((row.get("config_hash"), row.get("repeat")))
    return done


def prepare_run_dir(run_dir: Path, env: Dict[str, Any], resuming: bool, log) -> None:
    """Create the run directory and write env.json. A resumed run keeps its env.json unless it cannot be read
    (then it is written again, with a warning); a different software stack is warned about."""
    env_path = run_dir / "env.json"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resuming and env_path.exists():
            stored = _read_env(env_path, log)
            if stored is not None:
                _warn_if_other_stack(stored, env, log)
                return
        env_path.write_text(json.dumps(env, indent=2, default=str))
    except OSError as exc:
        raise write_error(env_path if run_dir.is_dir() else run_dir, exc) from exc


def _read_env(env_path: Path, log) -> Optional[Dict[str, Any]]:
    try:
        stored = json.loads(env_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log(f"optkit: warning: {env_path} cannot be read ({exc}); writing this machine's environment in its place")
        return None
    if not isinstance(stored, dict):
        log(f"optkit: warning: {env_path} holds no JSON object; writing this machine's environment in its place")
        return None
    return stored


def _warn_if_other_stack(stored: Dict[str, Any], env: Dict[str, Any], log) -> None:
    from optkit.measure.env import FINGERPRINT_FIELDS

    changed = [f for f in FINGERPRINT_FIELDS if stored.get(f) != env.get(f)]
    if changed:
        diffs = ", ".join(f"{f} {stored.get(f)} -> {env.get(f)}" for f in changed)
        log(f"optkit: warning: resuming on another stack ({diffs}); each row records its own versions")


def clean_stale_scratch(tmp_root: Optional[Path] = None) -> List[Path]:
    """Remove point scratch directories whose sweep process is gone (a sweep killed with -9 cannot clean up).
    Their names carry the sweep's pid: ``optkit-point-<pid>-*``."""
    root = Path(tmp_root or tempfile.gettempdir())
    removed = []
    for path in root.glob("optkit-*-*"):
        match = re.match(rf"^(?:{'|'.join(SCRATCH_PREFIXES)})(\d+)-", path.name)
        if match and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def scratch_prefix(kind: str) -> str:
    """Prefix of a scratch directory that ``clean_stale_scratch`` can tie to this process."""
    return f"optkit-{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
