"""The ``optkit report`` command: result runs -> tables (Markdown, CSV, LaTeX) and figures.

``optkit report RUN_DIR... [--out reports]`` writes ``reports/<gpu-slug>/<suite>/``: report.md, one
.csv and one booktabs .tex table per model (and ``kernels.*``), figures/*.png|pdf. Run dirs of
several GPU kinds for one suite add ``reports/cross-gpu/<suite>/``. Of several runs of one GPU kind
and suite the newest is reported; ``--merge`` pools them (rows of one point become extra windows).

Pure functions of the result files: no GPU, no torch. The steps, data flowing one way:
results/runs.py (run directories -> Run, rows grouped into Points) -> entries.py (Points -> table entries:
speedup and its CI, memory saving; the definitions) -> tables.py (entries -> Markdown / LaTeX / CSV) ->
sections.py and profile.py (report.md of one GPU kind and suite) and cross_gpu.py (reports/cross-gpu/<suite>/),
plots.py drawing the figures.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from optkit.report.cross_gpu import write_cross_gpu
from optkit.report.fit import is_fit_run, write_fit_report
from optkit.report.run_checks import load_checked
from optkit.report.sections import write_report
from optkit.results.runs import ReportInputError, Run, newest_of


def newest_run(runs: Sequence[Run]) -> Run:
    """The newest of ``runs`` (results/runs.py: by its last row's time); says which ones it leaves out."""
    newest = newest_of(runs)
    others = [r.run_id for r in runs if r is not newest]
    if others:
        print(
            f"optkit report: {newest.gpu_slug}/{newest.suite}: reporting the newest run {newest.run_id}, not "
            f"{', '.join(others)} (--merge pools them)",
            file=sys.stderr,
        )
    return newest


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="optkit report", description="tables and plots from result runs")
    parser.add_argument("run_dirs", nargs="+", help="results/<gpu>/<suite>/<run_id> directories")
    parser.add_argument("--out", default="reports", help="output root (default: reports)")
    parser.add_argument(
        "--baseline-opt",
        default=None,
        help="opt-set speedups are computed against (default: the rows' suite.baseline_opt, else 'baseline')",
    )
    parser.add_argument("--formats", default="png,pdf", help="figure formats, comma-separated (default: png,pdf)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="pool runs of one GPU kind and suite (their rows of a "
        "point become extra measurement windows); default: report the newest run of each",
    )
    args = parser.parse_args(argv)
    try:
        runs = [load_checked(d, "optkit report") for d in args.run_dirs]
    except ReportInputError as exc:
        print(f"optkit report: {exc}", file=sys.stderr)
        return 2
    formats = tuple(f.strip().lstrip(".") for f in args.formats.split(",") if f.strip())
    groups: Dict[tuple, List[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.gpu_slug, run.suite)].append(run)
    if not args.merge:
        groups = {key: [newest_run(group)] for key, group in groups.items()}
    for group_runs in groups.values():
        writer = write_fit_report if is_fit_run(group_runs) else write_report  # fit suites: what fits on each card
        print(writer(group_runs, Path(args.out), args.baseline_opt, formats))
    by_suite: Dict[str, Dict[str, List[Run]]] = defaultdict(dict)
    for (slug, suite), group_runs in groups.items():
        by_suite[suite][slug] = group_runs
    for per_gpu in by_suite.values():
        if len(per_gpu) > 1:
            print(write_cross_gpu(per_gpu, Path(args.out), args.baseline_opt, formats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
