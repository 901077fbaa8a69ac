"""In which order a sweep measures its windows, and the bench settings a suite asks for.

``bench.interleave=true`` runs every window in its own process, in rounds: window 0 of every point, then
window 1 of every point, ... (A B C A B C ...). A slow drift of the machine (clocks, heat, a neighbour) then
lands on every opt-set alike instead of on whichever ran last, and each opt-set's figures come from
processes spread over the whole sweep: what a confidence interval over processes needs.

A suite's ``fixed`` entries under ``bench.`` (e.g. ``bench.repeats: 3``) are the sweep's defaults for those
settings; the user's own ``bench.*`` overrides still win.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

Job = Tuple[int, List[int]]  # (index of the point, the repeat indexes one process measures)


def window_jobs(todo: Sequence[Sequence[int]], isolate: bool, interleave: bool) -> List[Job]:
    """The processes to start, in order, for points whose pending repeat indexes are ``todo[i]``: one
    process per point (its windows back to back), one per window point by point (``isolate``), or one per
    window in rounds (``interleave``)."""
    if interleave:
        rounds = sorted({r for pending in todo for r in pending})
        return [(i, [r]) for r in rounds for i, pending in enumerate(todo) if r in pending]
    if isolate:
        return [(i, [r]) for i, pending in enumerate(todo) for r in pending]
    return [(i, list(pending)) for i, pending in enumerate(todo) if pending]


def suite_bench_overrides(suite_name: str) -> List[str]:
    """``bench.KEY=VALUE`` for every ``bench.`` entry of the suite's ``fixed`` (none for an unknown suite:
    composing it reports that)."""
    from omegaconf import OmegaConf

    from optkit.config.compose import CONF_DIR

    path = CONF_DIR / "suite" / f"{suite_name}.yaml"
    if not path.is_file():
        return []
    fixed = OmegaConf.load(path).get("fixed")
    fixed = OmegaConf.to_container(fixed, resolve=True) if fixed is not None else {}
    return [f"{key}={_value(value)}" for key, value in fixed.items() if str(key).startswith("bench.")]


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)
