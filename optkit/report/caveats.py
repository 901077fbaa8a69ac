"""What a reader must know before reading a report's numbers, said under its environment block: rows measured
on a CPU (optkit's Triton kernels then ran under the Triton interpreter), lines of results.jsonl that hold no
row (skipped, named file:line), and rows whose stored tokens/s their own step times contradict."""

from __future__ import annotations

from typing import List, Sequence

from optkit.report.run_checks import bad_lines, describe, listed, tokens_per_s_mismatches
from optkit.results.runs import Run

INTERPRETER_CAVEAT = (
    "> **CPU rows: optkit's Triton kernels ran under the Triton interpreter** (`TRITON_INTERPRET=1`), which "
    "executes each kernel program in Python and NumPy, often 10-1000x slower than eager PyTorch. The times and "
    "speedups of these rows show that the pipeline runs, not how fast the kernels are: measure speed on a GPU."
)


def ran_on_cpu(runs: Sequence[Run]) -> bool:
    return any(r.gpu_slug == "cpu" or any(row.get("device") == "cpu" for row in r.rows) for r in runs)


def caveat_lines(runs: Sequence[Run]) -> List[str]:
    """Markdown lines (each followed by a blank line) for report.md; [] when there is nothing to say."""
    lines = []
    if ran_on_cpu(runs):
        applied = sorted({str(row.get("opt")) for r in runs for row in r.rows if row.get("applied_optimizations")})
        affected = f" Opt-sets that applied optimizations here: {', '.join(applied)}." if applied else ""
        lines += [INTERPRETER_CAVEAT + affected, ""]
    for run in runs:
        skipped = bad_lines(run.path / "results.jsonl")
        if skipped:
            lines += [f"> Run `{run.run_id}`: {describe(skipped)}.", ""]
        mismatches = tokens_per_s_mismatches(run)
        if mismatches:
            lines += [
                f"> Run `{run.run_id}`: {len(mismatches)} row(s) whose stored tokens/s disagrees with tokens per step "
                f"/ median step time (edited, or a broken writer; tables use the step times): {listed(mismatches, 3)}.",
                "",
            ]
    return lines
