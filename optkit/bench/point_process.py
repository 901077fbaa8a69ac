"""What a point's process is started as: its entry module and its environment.

- An ``opt.unsloth`` point starts as ``optkit.bench.unsloth_point`` (it imports unsloth before transformers
  and peft, then runs the ordinary point), with the variables that keep Unsloth offline set before Python
  starts (../shared/PEERS.md: some are read at import).
- Every point gets ``bench.alloc_conf`` as PYTORCH_ALLOC_CONF and PYTORCH_CUDA_ALLOC_CONF: one explicit
  allocator config for every peer of a sweep. torch reads the first name and falls back to the second;
  Unsloth sets the first for itself unless it is already set, so without this its points would run under
  another allocator config than the rest. Rows record the value their process saw (``alloc_conf``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from optkit.bench.unsloth_point import OFFLINE_ENV

POINT_MODULE = "optkit.bench.point"
UNSLOTH_POINT_MODULE = "optkit.bench.unsloth_point"
ALLOC_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def entry_module(config: Mapping[str, Any]) -> str:
    """The module ``python -m`` runs for a resolved point config."""
    return UNSLOTH_POINT_MODULE if (config.get("opt") or {}).get("unsloth") else POINT_MODULE


def point_env(config: Mapping[str, Any], base: Mapping[str, str]) -> Dict[str, str]:
    """``base`` plus the point's allocator config (and, for an unsloth point, the offline variables)."""
    env = dict(base)
    alloc = (config.get("bench") or {}).get("alloc_conf")
    if alloc:
        env.update(dict.fromkeys(ALLOC_ENV, alloc))
    if entry_module(config) == UNSLOTH_POINT_MODULE:
        env.update(OFFLINE_ENV)
    return env


def with_entry_module(cmd: List[str], config: Mapping[str, Any]) -> List[str]:
    """``cmd`` (a point's command, maybe under torchrun) with its entry module chosen for ``config``."""
    module = entry_module(config)
    return [module if part == POINT_MODULE else part for part in cmd]
