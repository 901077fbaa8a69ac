"""The results file: one JSON row per line, appended so that no kill can lose a finished row or glue a
torn one to the next, and read so that every line holding no row is named.

Why one line per row, fsync'd: a sweep can die at any moment (SIGKILL, the OOM killer, a full disk); a
finished row is then whole on disk, and a row cut short is one line of its own that readers skip by
number. (optkit.results.rows holds what a row means; this module only stores and reads rows.)
"""

from __future__ import annotations

import errno
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple


def finite(obj):
    """NaN / inf become None: JSON has no NaN, and a NaN loss must not lose the row."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


class ResultsFileError(Exception):
    """A results file that cannot be written; the message is one line and names the fix."""


_WRITE_FIXES = {
    errno.ENOSPC: "free disk space, or pass bench.results_dir=<a directory on another disk>",
    errno.EDQUOT: "free space under your quota, or pass bench.results_dir=<another directory>",
    errno.EROFS: "the file system is read-only: pass bench.results_dir=<a writable directory>",
    errno.EACCES: "make it writable, or pass bench.results_dir=<a writable directory>",
    errno.EPERM: "make it writable, or pass bench.results_dir=<a writable directory>",
}


def write_error(path: Path, exc: OSError) -> ResultsFileError:
    """The one-line error for an OSError while writing a results file."""
    fix = _WRITE_FIXES.get(exc.errno, "check the path, or pass bench.results_dir=<another directory>")
    return ResultsFileError(f"cannot write {path}: {exc.strerror or exc}; {fix}")


def append_row(path: Path, row: Dict[str, Any]) -> None:
    """Append one row as one line and fsync it, so a killed sweep loses at most the point in flight.

    The row starts on a fresh line: when the file ends in a fragment (a writer killed mid-line, a
    full disk), a newline goes first, so the fragment stays one unreadable line of its own and this row
    stays readable."""
    path = Path(path)
    line = json.dumps(finite(row), default=json_default, allow_nan=False).encode() + b"\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as fh:
            if fh.seek(0, os.SEEK_END) > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = b"\n" + line
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise write_error(path, exc) from exc


@dataclass(frozen=True)
class BadLine:
    """A line of a results file that holds no row."""

    number: int  # 1-based
    reason: str

    def __str__(self) -> str:
        return f"line {self.number} ({self.reason})"


def scan_rows(path: Path) -> Tuple[List[Dict[str, Any]], List[BadLine]]:
    """(rows, lines that hold no row) of a results.jsonl; blank lines are neither."""
    rows: List[Dict[str, Any]] = []
    bad: List[BadLine] = []
    if not Path(path).exists():
        return rows, bad
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                bad.append(BadLine(number, "torn or not JSON: a write cut short?"))
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad.append(BadLine(number, f"JSON {type(row).__name__}, not a row object"))
    return rows, bad


def describe_bad_lines(path: Path, bad: List[BadLine]) -> str:
    """One line naming every skipped line (the first five, then a count)."""
    named = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return f"{path}: skipped {len(bad)} line(s) that hold no row: {named}"


def read_rows(path: Path, warn: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """Rows of a results.jsonl; a line that holds no row (torn by a kill mid-write, not a JSON object) is
    skipped and reported through ``warn`` (default: one line on stderr)."""
    rows, bad = scan_rows(path)
    if bad:
        (warn or _warn_stderr)(describe_bad_lines(path, bad))
    return rows


def _warn_stderr(message: str) -> None:
    print(f"optkit: warning: {message}", file=sys.stderr, flush=True)
