"""What every report figure shares: the palette (Okabe-Ito colours, plus hatches, markers and line styles so
figures read in greyscale print), figure creation without pyplot (no global state, no display) and saving
as PNG (for report.md) and PDF (for a paper) with reproducible bytes."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import matplotlib
from matplotlib.figure import Figure

GIB = 1024**3
FORMATS = ("png", "pdf")  # PNG for report.md, PDF (vector) for papers
# Okabe-Ito: distinguishable with colour-vision deficiencies; hatches/markers carry it in grey.
COLORS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
HATCHES = ["", "//", "..", "xx", "\\\\", "++", "oo", "--"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", "-.", ":"]
RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "hatch.linewidth": 0.7,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def bar_style(i: int) -> dict:
    return {"color": COLORS[i % len(COLORS)], "hatch": HATCHES[i % len(HATCHES)]}


def line_style(i: int) -> dict:
    return {
        "color": COLORS[i % len(COLORS)],
        "marker": MARKERS[i % len(MARKERS)],
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
    }


def save(fig: Figure, stem: Path, formats: Sequence[str]) -> List[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(f".{ext}") for ext in formats]
    with matplotlib.rc_context(RC):
        for path in paths:
            # dpi matters for PNG only; no creation date in a PDF, so re-rendering a run rewrites identical bytes
            metadata = {"CreationDate": None} if path.suffix == ".pdf" else None
            fig.savefig(path, dpi=150, metadata=metadata)
    return paths


def new_figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kw):
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def entry_label(entry: dict) -> str:
    short = entry.get("setting_short")
    return f"{entry.get('opt')} {short}" if short else str(entry.get("opt"))


def status_note(ax, y: float, entry: dict, x: float = 0.0) -> None:
    """A failed point keeps its place in a figure: its status where the bar would be."""
    note = entry.get("status") if entry.get("status") != "ok" else entry.get("speedup_note")
    ax.text(x, y, f" {note}", va="center", ha="left", fontstyle="italic", fontsize=8)


def legend(fig: Figure, axes) -> None:
    """One legend below the figure (never over the data), each label once."""
    unique = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        unique.update(zip(labels, handles))
    if len(unique) > 1 or any("ceiling" in k for k in unique):
        fig.legend(unique.values(), unique.keys(), loc="outside lower center", ncols=min(len(unique), 4))


def peak_gib(entry: dict) -> Optional[float]:
    peak = entry.get("peak_nvml_bytes") or entry.get("peak_allocated_bytes")
    return None if peak is None else peak / GIB
