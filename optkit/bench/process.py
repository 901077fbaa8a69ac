"""Run a point's process so that no kill leaves anything behind, and say why one died.

The process gets its own process group (a timeout or Ctrl-C kills it and every helper it started, e.g.
torch.compile's workers, which would otherwise hold its pipes open) and, on Linux, dies with the sweep
(PR_SET_PDEATHSIG): a sweep killed with -9 leaves no orphan measuring on the GPU.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional

_PR_SET_PDEATHSIG = 1
# The line an uncaught exception ends a Python traceback with: "ValueError: ...", "torch.OutOfMemoryError: ..."
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b:?")
_SIGNAL_CAUSES = {
    signal.SIGKILL: "killed by SIGKILL (the kernel's out-of-memory killer, or kill -9)",
    signal.SIGSEGV: "crashed with SIGSEGV (a segmentation fault in native code)",
    signal.SIGABRT: "aborted (SIGABRT: a failed check in native code)",
    signal.SIGTERM: "terminated by SIGTERM",
    signal.SIGBUS: "crashed with SIGBUS",
}


@dataclass
class Finished:
    """How a point's process ended."""

    returncode: Optional[int]  # None: killed at the timeout
    stderr: str


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass


def run_process(cmd: List[str], env: dict, timeout_s: float) -> Finished:
    """Run ``cmd``; at ``timeout_s``, or when this process is interrupted, kill its whole process group."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
        return Finished(proc.returncode, stderr or "")
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        _, stderr = proc.communicate()
        return Finished(None, stderr or "")
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def exit_cause(returncode: int, stderr: str) -> str:
    """One line saying why a point's process ended without writing its rows: the exception its traceback
    ends with, the signal that killed it, or its exit code with the last thing it printed."""
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"killed by signal {-returncode}"
        return _SIGNAL_CAUSES.get(sig, f"killed by {sig.name}")
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    found = last_exception_line(lines)
    if found:
        return found[:500]
    last = f": {lines[-1][:300]}" if lines else " and printed nothing"
    return f"exited with code {returncode}{last}"


def last_exception_line(lines: List[str]) -> Optional[str]:
    """The last line that reads like the end of a Python traceback (``ValueError: ...``), else None."""
    return next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), None)
