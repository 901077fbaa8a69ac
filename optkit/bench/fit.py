"""suite.kind=fit: the largest sequence length (at batch 1) and the largest batch (at suite.fit.batch_seq_len
tokens a row) that fit, per model x method x opt-set x card, found by bisection over real measured points.

Every probe is a point of its own process (the runner's ``run_isolated``: an OOM cannot poison the next
probe) and a row (``fit_search``, ``fit_probe``), OOMs included; the answer is read back from the rows
(optkit/report/fit.py). A probe *fits* when it ran (status ok) and never used more than its card
(``card_exceeded`` is not true); an OOM, a card exceeded, an error or a timeout do not fit; a skipped probe
(the stack does not run here) ends its search.

The search (``search_largest``, a pure function of a probe callable) gallops by ``growth`` from its start
until a failure (or a fit) bounds it, then bisects on the grid of ``step``; with ``confirm`` the answer is
probed once more and a second try that fails moves the search down, so the answer is a value that fitted
every time. It assumes fitting is monotone in the searched value; what it guarantees without that is an
edge: the answer fitted and a value at most max(step, rel_tol x answer) above it did not. Cells of one
stack run smallest card first, and a bigger card's search starts at a smaller card's answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

Probe = Callable[[int], Optional[bool]]  # True: fits, False: does not, None: cannot tell (ends the search)


@dataclass
class Search:
    """What one search found: ``largest_fit`` fitted every time it was probed; ``smallest_failure`` is the
    smallest value that failed (None: nothing failed up to the range's top)."""

    largest_fit: Optional[int] = None
    smallest_failure: Optional[int] = None
    probes: List[Tuple[int, Optional[bool]]] = field(default_factory=list)  # in order
    stopped: Optional[str] = None  # why the search ended before it converged

    def outcomes(self, value: int) -> List[Optional[bool]]:
        return [fits for v, fits in self.probes if v == value]

    @property
    def flaky(self) -> List[int]:
        """Values that both fitted and failed."""
        return sorted({v for v, _ in self.probes if {True, False} <= set(self.outcomes(v))})

    @property
    def contradictions(self) -> List[Tuple[int, int]]:
        """(fit, failure) pairs with the fit above the failure: fitting was not monotone here."""
        fits = {v for v, f in self.probes if f and all(self.outcomes(v))}
        fails = {v for v, f in self.probes if f is False}
        return sorted((a, b) for a in fits for b in fails if a > b)


class _Grid:
    """Multiples of ``step`` within [low, high]."""

    def __init__(self, low: int, high: int, step: int):
        if step < 1 or high < low:
            raise ValueError(f"a fit search needs step >= 1 and high >= low (got {low}..{high} step {step})")
        self.step = step
        self.low = max(step, math.ceil(low / step) * step)
        self.high = math.floor(high / step) * step
        if self.high < self.low:
            raise ValueError(f"no multiple of {step} lies in {low}..{high}: widen the range or lower the step")

    def snap(self, value: float) -> int:
        return min(self.high, max(self.low, int(round(value / self.step)) * self.step))

    def snap_up(self, value: float) -> int:
        return min(self.high, max(self.low, math.ceil(value / self.step) * self.step))


def search_largest(
    probe: Probe,
    low: int,
    high: int,
    step: int = 1,
    start: Optional[int] = None,
    growth: float = 2.0,
    rel_tol: float = 0.0,
    confirm: bool = True,
    max_probes: int = 64,
) -> Search:
    """The largest value on the grid of ``step`` in [low, high] for which ``probe`` says it fits; the first
    probe is ``start`` rounded up to the grid (a figure to beat stays beaten), else ``low``."""
    grid = _Grid(low, high, step)
    found = Search()
    value: Optional[int] = grid.snap_up(start if start is not None else grid.low)
    while value is not None:
        if len(found.probes) >= max_probes:
            found.stopped = f"stopped after {max_probes} probes"
            break
        fits = probe(value)
        found.probes.append((value, fits))
        if fits is None:
            found.stopped = f"probe at {value} could not tell (skipped)"
            break
        _update_bounds(found)
        value = _next_value(found, grid, growth, rel_tol)
        if value is None and confirm:
            value = _unconfirmed(found)
    _update_bounds(found)
    return found


def summarize(probes: Sequence[Tuple[int, Optional[bool]]]) -> Search:
    """A search's answer read back from its probes (value, fits), in the order they were measured."""
    found = Search(probes=list(probes))
    _update_bounds(found)
    return found


def _update_bounds(found: Search) -> None:
    """Bounds from every probe so far: a value fits only if it fitted every time; the largest such value
    below the smallest failure is the answer (a fit above a failure is a contradiction, not an answer)."""
    failures = [v for v, fits in found.probes if fits is False]
    found.smallest_failure = min(failures) if failures else None
    fits = [
        v
        for v, f in found.probes
        if f and all(found.outcomes(v)) and (found.smallest_failure is None or v < found.smallest_failure)
    ]
    found.largest_fit = max(fits) if fits else None


def _next_value(found: Search, grid: _Grid, growth: float, rel_tol: float) -> Optional[int]:
    fit, fail = found.largest_fit, found.smallest_failure
    if fail is None:  # no upper bound yet: grow from the largest fit
        return None if fit >= grid.high else max(fit + grid.step, grid.snap(fit * growth))
    if fit is None:  # nothing fits yet: shrink from the smallest failure
        return None if fail <= grid.low else min(fail - grid.step, grid.snap(fail / growth))
    if fail - fit <= max(grid.step, rel_tol * fit):
        return None
    middle = grid.snap((fit + fail) / 2)
    middle = min(max(middle, fit + grid.step), fail - grid.step)
    return middle if fit < middle < fail else None


def _unconfirmed(found: Search) -> Optional[int]:
    """The answer again when it was probed once only (a flaky fit then moves the search down)."""
    fit = found.largest_fit
    return fit if fit is not None and len(found.outcomes(fit)) == 1 else None


# --------------------------------------------------------------------------- a fit suite


def probe_fits(row: Dict[str, Any]) -> Optional[bool]:
    """Whether a probe's row counts as fitting its card (None: the point did not run here: skipped)."""
    status = row.get("status")
    if status == "skipped":
        return None
    return status == "ok" and row.get("card_exceeded") is not True


SEARCH_OVERRIDES = {  # the search's variable last (it wins over the cell's own settings)
    "seq_len": lambda fit, v: ["train.batch_size=1", f"data.seq_len={v}"],
    "batch_size": lambda fit, v: [f"data.seq_len={fit.batch_seq_len}", f"train.batch_size={v}"],
}


def search_range(fit, search: str) -> Tuple[int, int, int]:
    """(low, high, step) of a search from suite.fit."""
    if search == "seq_len":
        return fit.seq_len_min, fit.seq_len_max, fit.seq_len_step
    return fit.batch_min, fit.batch_max, 1


def fit_cells(suite_cfg, user_overrides: Sequence[str], expand: Callable) -> List[List[str]]:
    """Each explicit point of the suite (a stack: method, opt-set, checkpointing...) crossed with the axes'
    product (models, cards), through the runner's ``expand`` (its precedence: fixed < axes < user)."""
    from omegaconf import OmegaConf

    stacks = OmegaConf.to_container(suite_cfg.points, resolve=True) or [{}]
    fixed = OmegaConf.to_container(suite_cfg.fixed, resolve=True)
    cells: List[List[str]] = []
    for stack in stacks:
        suite = OmegaConf.merge(suite_cfg, {"points": []})
        suite.fixed = {**fixed, **stack}
        cells.extend(expand(suite, list(user_overrides)))
    return cells


def _card(cell_cfg):
    from optkit.bench.card import card_of

    return card_of(cell_cfg.bench.card, cell_cfg.bench.card_gib)


def _stack_key(cell: Sequence[str]) -> Tuple[str, ...]:
    """A cell without its card: cells of one stack share it."""
    return tuple(o for o in cell if not o.startswith(("bench.card=", "bench.card_gib=")))


Measure = Callable[[List[str], Any, Dict[str, Any]], List[Dict[str, Any]]]


def run_fit_suite(
    cells: Sequence[List[str]], compose: Callable[[List[str]], Any], measure: Measure, log=lambda line: None
) -> List[Dict[str, Any]]:
    """Run every search of each cell's suite.fit (a stack may override it) on the cell; returns one summary
    per (cell, search).

    ``measure(overrides, cfg, fields)`` runs one probe point (a process), sets ``fields`` on its rows and
    records them (``recorded_measure``). Cells of a stack run smallest card first; a card's seq_len search
    starts at ``fit.seq_len_start[card]``, else (``fit.start_from_smaller_card``) at a smaller card's answer."""
    cell_cfgs = [compose(list(c)) for c in cells]
    sizes = [_card(c).total_bytes if _card(c) else 1 << 62 for c in cell_cfgs]  # no card: the whole GPU, last
    answers: Dict[Tuple[Tuple[str, ...], str], int] = {}  # (stack, search) -> the last smaller card's answer
    summaries = []
    for i in sorted(range(len(cells)), key=lambda i: (_stack_key(cells[i]), sizes[i])):
        cell, card, fit = list(cells[i]), _card(cell_cfgs[i]), cell_cfgs[i].suite.fit
        for search in fit.searches:
            probes = iter(range(1 << 30))

            def probe(value: int, extra: Sequence[str] = (), search=search, cell=cell, fit=fit, probes=probes):
                point = cell + SEARCH_OVERRIDES[search](fit, value) + list(extra)
                rows = measure(point, compose(point), {"fit_search": search, "fit_probe": next(probes)})
                verdicts = [probe_fits(r) for r in rows]
                verdict = None if None in verdicts or not verdicts else all(verdicts)
                label = {True: "fits", False: "does not fit", None: "skipped"}[verdict]
                log(f"    {search}={value}{' ' + ' '.join(extra) if extra else ''}: {label}")
                return verdict

            low, high, step = search_range(fit, search)
            start = answers.get((_stack_key(cell), search)) if fit.start_from_smaller_card else None
            if search == "seq_len" and fit.use_seq_len_start and card is not None and card.name in fit.seq_len_start:
                start = fit.seq_len_start[card.name]
            log(f"fit: {' '.join(o for o in cell if not o.startswith('suite='))} [{search}]")
            found = search_largest(probe, low, high, step, start, fit.growth, fit.rel_tol, fit.confirm, fit.max_probes)
            if found.largest_fit is not None:
                answers[(_stack_key(cell), search)] = found.largest_fit
            log(f"  -> largest {search} that fits: {found.largest_fit} (smallest failure: {found.smallest_failure})")
            summaries.append({"cell": cell, "search": search, **found.__dict__})
            if card is not None and card.name in fit.check_ballast_on:
                for value in (found.largest_fit, found.smallest_failure):  # the honesty check: the same edge?
                    if value is not None:
                        probe(value, ["bench.card_mode=ballast"])
    return summaries


def probe_identity(config: Dict[str, Any]) -> str:
    """What a probe measured: its resolved config without the suite (a search's settings, max_probes included,
    do not change a probe), so a resumed search with other settings still reads the probes it made."""
    from optkit.results.rows import config_hash

    return config_hash({k: v for k, v in config.items() if k != "suite"})


def recorded_measure(
    run_point: Callable[[List[str], Any], List[Dict[str, Any]]],
    as_dict: Callable[[Any], Dict[str, Any]],
    record: Callable[[Dict[str, Any]], None],
    earlier_rows: Sequence[Dict[str, Any]] = (),
) -> Measure:
    """``measure`` for run_fit_suite: runs a probe (``run_point``: the runner's isolated process), sets the
    fit fields on its rows and ``record``s them. Resuming, ``earlier_rows`` (a fit run's rows) answer the
    probes again in the order they were measured, so the search replays them and measures only what is
    missing (a value probed twice, as ``confirm`` does, reads its two rows in turn). ``as_dict``: a composed
    config as a plain dict (the runner's)."""
    queued: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for row in earlier_rows:
        if row.get("fit_search") is not None and row.get("config"):
            queued.setdefault((probe_identity(row["config"]), row["fit_search"]), []).append(row)

    def measure(point: List[str], cfg, fields: Dict[str, Any]) -> List[Dict[str, Any]]:
        waiting = queued.get((probe_identity(as_dict(cfg)), fields["fit_search"]))
        if waiting:
            return [waiting.pop(0)]
        rows = run_point(point, cfg)
        for row in rows:
            row.update(fields)
            record(row)
        return rows

    return measure
