"""How the runner starts a point's process(es), and what it reads back when a point of several died.

A point with ``train.distributed`` other than ``none`` runs as ``bench.gpus`` processes started by
``python -m torch.distributed.run --standalone --nproc_per_node N -m optkit.bench.point ...`` (torchrun):
still one isolated launch per point, killed as a whole at the timeout (its process group). torchrun tears
the other ranks down as soon as one exits with an error, so a failure anywhere ends the point.

Rank 0 writes the point's rows (``--out``). A rank whose point failed (an exception, an OOM, a skip) writes
its own rows to ``rank_rows_file(out, rank)`` before it exits; the runner takes the first such file
(the first failure; later ones are usually peers losing their connection to it). A rank killed outright
(a signal, the OOM killer) writes nothing: torchrun's "Root Cause" report names it, and
``failure_cause`` reads it from there.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from optkit.bench.ranks import rank_rows_file

POINT_MODULE = "optkit.bench.point"
# torchrun checks its workers this often (s); its default of 0.1 s busy-polls a shared CPU for nothing
MONITOR_INTERVAL_S = 0.5
# one failed process in torchrun's report: "rank      : 1 (local_rank: 1)\n  exitcode  : -6 (pid: 123)"
_RANK_EXIT = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*exitcode\s*:\s*(-?\d+)")


def is_distributed(config: Dict[str, Any]) -> bool:
    """Whether a resolved point config runs through torch.distributed (any world size, 1 included)."""
    return config["train"].get("distributed", "none") != "none"


def point_command(config: Dict[str, Any], point_args: List[str]) -> List[str]:
    """The command that runs the point: ``python -m optkit.bench.point ARGS`` in one process, or under
    torchrun with one process per GPU (``bench.gpus``) when the point is distributed."""
    if not is_distributed(config):
        return [sys.executable, "-m", POINT_MODULE, *point_args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a local rendezvous on a free port: concurrent launches never collide
        "--nproc_per_node",
        str(config["bench"].get("gpus", 1)),
        "--monitor-interval",
        str(MONITOR_INTERVAL_S),
        "-m",
        POINT_MODULE,
        *point_args,
    ]


def visible_gpus() -> Optional[int]:
    """CUDA GPUs this machine shows; None without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else None


def skip_reason(config: Dict[str, Any], visible_gpus: Optional[int]) -> Optional[str]:
    """Why the point cannot be launched on this machine (a ``skipped`` row), or None. ``visible_gpus`` is
    None on a machine without CUDA: there bench.gpus processes share the CPU (gloo)."""
    gpus = config["bench"].get("gpus", 1)
    on_cpu = visible_gpus is None or config["bench"].get("device") == "cpu"
    if on_cpu or gpus <= visible_gpus:
        return None
    return f"bench.gpus={gpus} but this machine shows {visible_gpus} GPU(s): run it where {gpus} are visible"


# --------------------------------------------------------------------------- failures


def rank_failure_rows(out: Path, stderr: str = "") -> Optional[List[Dict[str, Any]]]:
    """The rows of the first rank that failed and said so; None when none did, or when a rank was killed by
    a signal without writing any (its crash is the cause: the errors its peers wrote are what followed)."""
    failures = {}
    for path in Path(out).parent.glob(rank_rows_file(Path(out), 0).name.replace(".rank0", ".rank*")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # killed while writing: torchrun's report still names it
        failures[payload["rank"]] = payload
    if not failures or _crashed_ranks(stderr) - set(failures):
        return None
    return min(failures.values(), key=lambda f: f["failed_at"])["rows"]


def failure_cause(stderr: str) -> Optional[str]:
    """Which rank ended the point and how, from torchrun's report of failed processes: a rank killed by a
    signal if there is one (a peer's death makes the others fail, never crash), else the first observed
    failure; None without a report (a point of one process)."""
    exits = _rank_exits(stderr)
    if not exits:
        return None
    crashed = sorted(_crashed_ranks(stderr))
    rank = crashed[0] if crashed else exits[-1][0]  # the report lists the root cause last
    code = dict(exits)[rank]
    from optkit.bench.process import exit_cause

    how = exit_cause(code, "") if code < 0 else f"exited with code {code}"
    return f"rank {rank} {how}"


def _rank_exits(stderr: str) -> List[Tuple[int, int]]:
    """(rank, exit code) of each failed process in torchrun's report, in the report's order."""
    return [(int(rank), int(code)) for rank, code in _RANK_EXIT.findall(stderr or "")]


def _crashed_ranks(stderr: str) -> set:
    """Ranks a signal killed, other than the SIGTERM torchrun sends the survivors when it ends a launch."""
    return {rank for rank, code in _rank_exits(stderr) if code < 0 and -code != signal.SIGTERM}
