"""Bar figures of a report: speedup, step phases, memory, kernel bandwidth, cross-GPU. Each function takes
table entries from optkit.report (plain dicts), writes ``<stem>.png`` and ``<stem>.pdf`` and returns their
paths, or [] when the data has nothing to show (no figure beats an empty one). Line figures over a sweep
axis or over time are curves.py's; the shared style is figure_style.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence

import matplotlib

from optkit.report.figure_style import (
    FORMATS,
    GIB,
    RC,
    bar_style,
    entry_label,
    legend,
    new_figure,
    save,
    status_note,
)
from optkit.report.tables import ratio

LOG_SPREAD = 10.0  # speedups spanning more than this factor get a log axis, where 0.003x and 1.2x both read


def _bar_chart(
    items: Sequence[dict],
    draw: Callable,
    xlabel: str,
    title: str,
    stem: Path,
    formats: Sequence[str],
    row_inches: float = 0.42,
    note_x: float = 0.0,
    log_x: bool = False,
) -> List[Path]:
    """Horizontal bars, one row per point, first point on top; ``draw(ax, y, entry)`` draws an ok
    point's bars and returns False when it has nothing to draw (its note is shown instead)."""
    with matplotlib.rc_context(RC):
        fig, axes = new_figure(6.4, row_inches * len(items) + 1.3)
        ax = axes[0][0]
        if log_x:
            ax.set_xscale("log")
        for y, e in enumerate(reversed(items)):
            if e.get("status") != "ok" or draw(ax, y, e) is False:
                status_note(ax, y, e, x=note_x)
        ax.set_yticks(range(len(items)), [entry_label(e) for e in reversed(items)])
        ax.set_ylim(-0.7, len(items) - 0.3)
        ax.set_xlabel(xlabel)
        ax.margins(x=0.15)
        ax.set_title(title)
        legend(fig, [ax])
    return save(fig, stem, formats)


def speedup_bars(entries: Sequence[dict], title: str, stem: Path, formats: Sequence[str] = FORMATS) -> List[Path]:
    """One bar per opt-set from 1.0 to its speedup, with the 95% CI; failed points as text."""
    items = [
        e
        for e in entries
        if e.get("speedup_note") != "reference"
        and (e.get("speedup") is not None or e.get("status") != "ok" or e.get("speedup_note"))
    ]
    values = [v for e in items for v in (e.get("speedup"), e.get("speedup_ci95_low"), e.get("speedup_ci95_high"))]
    values = [v for v in values if v is not None and v > 0] + [1.0]
    if len(values) == 1:
        return []
    log_axis = max(values) / min(values) > LOG_SPREAD

    def draw(ax, y, e):
        value = e.get("speedup")
        if value is None or value <= 0:
            return False
        err = None
        if e.get("speedup_ci95_low") is not None:
            err = [[value - e["speedup_ci95_low"]], [e["speedup_ci95_high"] - value]]
        ax.barh(
            y,
            value - 1.0,
            left=1.0,
            xerr=err,
            capsize=3,
            edgecolor="black",
            linewidth=0.6,
            label="faster" if value >= 1 else "slower",
            **bar_style(0 if value >= 1 else 1),
        )
        if value >= 1:  # the value label goes beyond the bar and its CI, on the bar's side of 1.0
            ax.text(max(value, e.get("speedup_ci95_high") or value), y, f"  {ratio(value)}×", va="center", fontsize=8)
        else:
            ax.text(
                min(value, e.get("speedup_ci95_low") or value),
                y,
                f"{ratio(value)}×  ",
                va="center",
                ha="right",
                fontsize=8,
            )
        ax.axvline(1.0, color="black", linewidth=0.8)

    xlabel = "speedup (tokens/s vs baseline, 95% CI" + (", log scale)" if log_axis else ")")
    return _bar_chart(items, draw, xlabel, title, stem, formats, note_x=1.0, log_x=log_axis)


def phase_bars(entries: Sequence[dict], title: str, stem: Path, formats: Sequence[str] = FORMATS) -> List[Path]:
    """Forward / backward / optimizer time stacked per point (ms)."""
    phases = [("forward_ms", "forward"), ("backward_ms", "backward"), ("optimizer_ms", "optimizer")]
    items = [e for e in entries if any(e.get(k) is not None for k, _ in phases) or e.get("status") != "ok"]
    if not any(e.get("forward_ms") is not None for e in items):
        return []

    def draw(ax, y, e):
        left = 0.0
        for i, (key, name) in enumerate(phases):
            width = e.get(key) or 0.0
            ax.barh(y, width, left=left, edgecolor="black", linewidth=0.6, label=name, **bar_style(i))
            left += width
        ax.text(left, y, f"  {left:,.0f} ms", va="center", fontsize=8)

    return _bar_chart(items, draw, "median time per step (ms)", title, stem, formats)


def memory_bars(entries: Sequence[dict], title: str, stem: Path, formats: Sequence[str] = FORMATS) -> List[Path]:
    """Peak memory per point: NVML (what the GPU saw) beside the allocator's peak."""
    sources = [("peak_nvml_bytes", "NVML peak"), ("peak_allocated_bytes", "allocator peak")]
    items = [e for e in entries if any(e.get(k) for k, _ in sources) or e.get("status") != "ok"]
    if not any(e.get(k) for e in items for k, _ in sources):
        return []

    def draw(ax, y, e):
        for i, (key, name) in enumerate(sources):
            if e.get(key):
                offset = 0.2 - 0.4 * i
                ax.barh(
                    y + offset, e[key] / GIB, height=0.38, edgecolor="black", linewidth=0.6, label=name, **bar_style(i)
                )
                ax.text(e[key] / GIB, y + offset, f" {e[key] / GIB:.1f}", va="center", fontsize=7)

    return _bar_chart(items, draw, "peak memory (GiB)", title, stem, formats, row_inches=0.5)


def kernel_bandwidth(
    entries: Sequence[dict], ceiling_gbps: Optional[float], title: str, stem: Path, formats: Sequence[str] = FORMATS
) -> List[Path]:
    """Achieved GB/s per op and implementation, against the copy ceiling measured in the same run."""
    if not any(e.get("gbps_full") for e in entries):
        return []
    groups = list(dict.fromkeys(e["group"] for e in entries))
    impls = list(dict.fromkeys(e["impl"] for e in entries))
    width = 0.8 / len(impls)
    with matplotlib.rc_context(RC):
        fig, axes = new_figure(max(6.4, 1.4 * len(groups) + 2.0), 3.8)
        ax = axes[0][0]
        for i, impl in enumerate(impls):
            for g, group in enumerate(groups):
                e = next((x for x in entries if x["group"] == group and x["impl"] == impl), None)
                x = g - 0.4 + width * (i + 0.5)
                if e is None:
                    continue
                if not e.get("gbps_full"):
                    ax.text(
                        x,
                        0,
                        f" {e.get('status')}",
                        rotation=90,
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        fontstyle="italic",
                    )
                    continue
                ax.bar(x, e["gbps_full"], width=width, edgecolor="black", linewidth=0.6, label=impl, **bar_style(i))
        if ceiling_gbps:
            ax.axhline(
                ceiling_gbps,
                color="black",
                linestyle="--",
                linewidth=1.0,
                label=f"copy ceiling ({ceiling_gbps:,.0f} GB/s)",
            )
        ax.set_xticks(range(len(groups)), [g.replace("/", "\n", 1).replace("/", " ") for g in groups])
        ax.set_ylabel("achieved bandwidth, fwd+bwd (GB/s)")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.15)
        ax.set_title(title)
        legend(fig, [ax])
    return save(fig, stem, formats)


def cross_gpu_bars(
    labels: Sequence[str], panels: Sequence[tuple], title: str, stem: Path, formats: Sequence[str] = FORMATS
) -> List[Path]:
    """Grouped horizontal bars, one group per point and one bar per GPU kind, one panel per metric."""
    panels = [(name, values) for name, values in panels if any(v is not None for vs in values.values() for v in vs)]
    if not labels or not panels:
        return []
    with matplotlib.rc_context(RC):
        fig, axes = new_figure(
            4.2 * len(panels) + 2.0,
            0.55 * len(labels) * max(1, len(panels[0][1]) / 2) + 1.4,
            ncols=len(panels),
            sharey=True,
        )
        for ax, (name, per_gpu) in zip(axes[0], panels):
            height = 0.8 / len(per_gpu)
            for i, (slug, values) in enumerate(per_gpu.items()):
                for y, value in enumerate(reversed(values)):
                    if value is None:
                        continue
                    offset = 0.4 - height * (i + 0.5)
                    ax.barh(
                        y + offset, value, height=height, edgecolor="black", linewidth=0.6, label=slug, **bar_style(i)
                    )
                    ax.text(
                        value, y + offset, f" {value:,.2f}" if value < 10 else f" {value:,.0f}", va="center", fontsize=7
                    )
            ax.set_xlabel(name)
            ax.margins(x=0.15)
        axes[0][0].set_yticks(range(len(labels)), list(reversed(labels)))
        legend(fig, axes[0])
        fig.suptitle(title)
    return save(fig, stem, formats)
