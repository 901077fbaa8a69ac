"""Figures of a report, each written as PNG (for report.md) and PDF (for a paper).

Every function takes table entries from optkit.report (plain dicts), writes ``<stem>.png`` and
``<stem>.pdf`` and returns their paths, or [] when the data has nothing to show (no figure beats
an empty one). Series differ by hatch, marker and line style as well as colour, so the figures read
in greyscale print. Figures are built without pyplot: no global state, no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

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


def _style(i: int) -> dict:
    return {"color": COLORS[i % len(COLORS)], "hatch": HATCHES[i % len(HATCHES)]}


def _line(i: int) -> dict:
    return {
        "color": COLORS[i % len(COLORS)],
        "marker": MARKERS[i % len(MARKERS)],
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
    }


def _save(fig: Figure, stem: Path, formats: Sequence[str]) -> List[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(f".{ext}") for ext in formats]
    with matplotlib.rc_context(RC):
        for path in paths:
            # dpi matters for PNG only; no creation date in a PDF, so re-rendering a run rewrites identical bytes
            metadata = {"CreationDate": None} if path.suffix == ".pdf" else None
            fig.savefig(path, dpi=150, metadata=metadata)
    return paths


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kw):
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _label(entry: dict) -> str:
    short = entry.get("setting_short")
    return f"{entry.get('opt')} {short}" if short else str(entry.get("opt"))


def _status_note(ax, y: float, entry: dict, x: float = 0.0) -> None:
    """A failed point keeps its place in a figure: its status where the bar would be."""
    note = entry.get("status") if entry.get("status") != "ok" else entry.get("speedup_note")
    ax.text(x, y, f" {note}", va="center", ha="left", fontstyle="italic", fontsize=8)


def _legend(fig: Figure, axes) -> None:
    """One legend below the figure (never over the data), each label once."""
    unique = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        unique.update(zip(labels, handles))
    if len(unique) > 1 or any("ceiling" in k for k in unique):
        fig.legend(unique.values(), unique.keys(), loc="outside lower center", ncols=min(len(unique), 4))


def _bar_chart(
    items: Sequence[dict],
    draw: Callable,
    xlabel: str,
    title: str,
    stem: Path,
    formats: Sequence[str],
    row_inches: float = 0.42,
    note_x: float = 0.0,
) -> List[Path]:
    """Horizontal bars, one row per point, first point on top; ``draw(ax, y, entry)`` draws an ok
    point's bars and returns False when it has nothing to draw (its note is shown instead)."""
    with matplotlib.rc_context(RC):
        fig, axes = _figure(6.4, row_inches * len(items) + 1.3)
        ax = axes[0][0]
        for y, e in enumerate(reversed(items)):
            if e.get("status") != "ok" or draw(ax, y, e) is False:
                _status_note(ax, y, e, x=note_x)
        ax.set_yticks(range(len(items)), [_label(e) for e in reversed(items)])
        ax.set_ylim(-0.7, len(items) - 0.3)
        ax.set_xlabel(xlabel)
        ax.margins(x=0.15)
        ax.set_title(title)
        _legend(fig, [ax])
    return _save(fig, stem, formats)


def speedup_bars(entries: Sequence[dict], title: str, stem: Path, formats: Sequence[str] = FORMATS) -> List[Path]:
    """One bar per opt-set from 1.0 to its speedup, with the 95% CI; failed points as text."""
    items = [
        e
        for e in entries
        if e.get("speedup_note") != "reference"
        and (e.get("speedup") is not None or e.get("status") != "ok" or e.get("speedup_note"))
    ]
    if not any(e.get("speedup") is not None for e in items):
        return []

    def draw(ax, y, e):
        value = e.get("speedup")
        if value is None:
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
            **_style(0 if value >= 1 else 1),
        )
        if value >= 1:  # the value label goes beyond the bar and its CI, on the bar's side of 1.0
            ax.text(max(value, e.get("speedup_ci95_high") or value), y, f"  {value:.2f}×", va="center", fontsize=8)
        else:
            ax.text(
                min(value, e.get("speedup_ci95_low") or value),
                y,
                f"{value:.2f}×  ",
                va="center",
                ha="right",
                fontsize=8,
            )
        ax.axvline(1.0, color="black", linewidth=0.8)

    return _bar_chart(items, draw, "speedup (tokens/s vs baseline, 95% CI)", title, stem, formats, note_x=1.0)


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
            ax.barh(y, width, left=left, edgecolor="black", linewidth=0.6, label=name, **_style(i))
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
                    y + offset, e[key] / GIB, height=0.38, edgecolor="black", linewidth=0.6, label=name, **_style(i)
                )
                ax.text(e[key] / GIB, y + offset, f" {e[key] / GIB:.1f}", va="center", fontsize=7)

    return _bar_chart(items, draw, "peak memory (GiB)", title, stem, formats, row_inches=0.5)


def scaling_lines(entries: Sequence[dict], title: str, stem: Path, formats: Sequence[str] = FORMATS) -> List[Path]:
    """tokens/s and peak memory against sequence length, one line per opt-set; OOM points marked."""
    if len({e.get("seq_len") for e in entries if e.get("seq_len")}) < 2:
        return []
    opts = list(dict.fromkeys(e["opt"] for e in entries))
    with matplotlib.rc_context(RC):
        fig, axes = _figure(9.0, 3.4, ncols=2)
        panels = [
            (axes[0][0], lambda e: e.get("tokens_per_s"), "tokens/s"),
            (axes[0][1], _peak_gib, "peak memory (GiB; NVML, else allocator)"),
        ]
        for ax, value, ylabel in panels:
            for i, opt in enumerate(opts):
                mine = sorted((e for e in entries if e["opt"] == opt and e.get("seq_len")), key=lambda e: e["seq_len"])
                ok = [e for e in mine if value(e) is not None]
                ax.plot([e["seq_len"] for e in ok], [value(e) for e in ok], label=opt, markersize=5, **_line(i))
                for e in mine:
                    if e.get("status") != "ok":
                        ax.plot(
                            e["seq_len"],
                            0.96,
                            transform=ax.get_xaxis_transform(),
                            marker="X",
                            markersize=9,
                            color=COLORS[i % len(COLORS)],
                            linestyle="none",
                        )
                        ax.annotate(
                            f"{opt}: {e['status']}",
                            (e["seq_len"], 0.96),
                            xycoords=ax.get_xaxis_transform(),
                            xytext=(-4, -4),
                            textcoords="offset points",
                            ha="right",
                            va="top",
                            fontsize=7,
                        )
            ax.set_xscale("log", base=2)
            seqs = sorted({e["seq_len"] for e in entries if e.get("seq_len")})
            ax.set_xticks(seqs, [str(s) for s in seqs])
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.12)
            ax.grid(alpha=0.3)
        axes[0][0].legend()
        fig.suptitle(title)
    return _save(fig, stem, formats)


def _peak_gib(entry: dict) -> Optional[float]:
    peak = entry.get("peak_nvml_bytes") or entry.get("peak_allocated_bytes")
    return None if peak is None else peak / GIB


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
        fig, axes = _figure(max(6.4, 1.4 * len(groups) + 2.0), 3.8)
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
                ax.bar(x, e["gbps_full"], width=width, edgecolor="black", linewidth=0.6, label=impl, **_style(i))
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
        _legend(fig, [ax])
    return _save(fig, stem, formats)


def loss_curves(
    curves: Dict[str, Sequence[float]],
    base_curves: Dict[str, Optional[Sequence[float]]],
    gaps: Dict[str, tuple],
    title: str,
    stem: Path,
    formats: Sequence[str] = FORMATS,
) -> List[Path]:
    """Loss per step (top) and its difference from the baseline's curve (bottom), max gap in the legend."""
    curves = {k: v for k, v in curves.items() if v and len(v) >= 2}
    if not curves:
        return []
    compared = [k for k in curves if base_curves.get(k) and gaps.get(k, (None,))[0] is not None]
    with matplotlib.rc_context(RC):
        if compared:
            fig, axes = _figure(7.0, 5.0, nrows=2, sharex=True, height_ratios=[2, 1])
        else:  # nothing to compare with: no empty difference panel
            fig, axes = _figure(7.0, 3.4)
        top = axes[0][0]
        every = max(1, max(len(v) for v in curves.values()) // 12)
        for i, (label, curve) in enumerate(curves.items()):
            style = _line(i)
            legend = f"{label} (max gap {gaps[label][0]:.3g} at step {gaps[label][1]})" if label in compared else label
            top.plot(range(len(curve)), curve, label=legend, markevery=every, markersize=4, **style)
            if label in compared:
                diff = [a - b if a is not None and b is not None else None for a, b in zip(curve, base_curves[label])]
                axes[1][0].plot(range(len(diff)), diff, markevery=every, markersize=4, **style)
        values = [x for v in curves.values() for x in v if x is not None]
        if values and min(values) > 0 and max(values) / min(values) > 100:
            # a loss that falls by orders of magnitude: on a linear axis the learning phase is a spike
            top.set_yscale("log")
            top.set_ylabel("training loss (log scale)")
        else:
            top.set_ylabel("training loss")
        top.legend()
        top.set_title(title)
        bottom = axes[-1][0]
        bottom.set_xlabel("step (warm-up included)")
        if compared:
            bottom.axhline(0.0, color="black", linewidth=0.8)
            bottom.set_ylabel("loss - baseline")
        for ax in axes[:, 0]:
            ax.grid(alpha=0.3)
    return _save(fig, stem, formats)


def vram_timeline(
    series: Dict[str, Sequence[Sequence[float]]], title: str, stem: Path, formats: Sequence[str] = FORMATS
) -> List[Path]:
    """NVML device memory over the point's lifetime ([t_ms, bytes] samples), peak marked."""
    series = {k: v for k, v in series.items() if v and len(v) >= 2}
    if not series:
        return []
    with matplotlib.rc_context(RC):
        fig, axes = _figure(7.0, 3.4)
        ax = axes[0][0]
        for i, (label, samples) in enumerate(series.items()):
            t = [s[0] / 1e3 for s in samples]
            used = [s[1] / GIB for s in samples]
            style = _line(i)
            peak = max(range(len(used)), key=used.__getitem__)
            ax.plot(
                t,
                used,
                label=f"{label} (peak {used[peak]:.1f} GiB)",
                color=style["color"],
                linestyle=style["linestyle"],
            )
            ax.plot(t[peak], used[peak], marker=style["marker"], color=style["color"], markersize=7)
        ax.set_xlabel("time since the point started (s)")
        ax.set_ylabel("GPU memory used (GiB)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        ax.set_title(title)
    return _save(fig, stem, formats)


def vram_step(
    series: Dict[str, Sequence[Sequence[float]]], title: str, stem: Path, formats: Sequence[str] = FORMATS
) -> List[Path]:
    """NVML device memory within one training step ([ms since the step began, bytes]), one line per
    opt-set on one axis (the first is the baseline); line style and markers tell them apart in grey."""
    series = {k: v for k, v in series.items() if v and len(v) >= 2}
    if not series:
        return []
    with matplotlib.rc_context(RC):
        fig, axes = _figure(7.0, 3.6)
        ax = axes[0][0]
        for i, (label, samples) in enumerate(series.items()):
            t = [s[0] for s in samples]
            used = [s[1] / GIB for s in samples]
            style = _line(i)
            ax.plot(
                t,
                used,
                label=f"{label} (peak {max(used):.2f} GiB)",
                linewidth=1.8 if i == 0 else 1.3,
                markevery=max(1, len(t) // 12),
                markersize=5,
                **style,
            )
        ax.set_xlabel("time since the step began (ms)")
        ax.set_ylabel("GPU memory used, NVML (GiB)")
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.05)  # from 0: differences between opt-sets at true scale
        ax.grid(alpha=0.3)
        ax.set_title(title)
        fig.legend(loc="outside lower center", ncols=min(len(series), 3))
    return _save(fig, stem, formats)


def cross_gpu_bars(
    labels: Sequence[str], panels: Sequence[tuple], title: str, stem: Path, formats: Sequence[str] = FORMATS
) -> List[Path]:
    """Grouped horizontal bars, one group per point and one bar per GPU kind, one panel per metric."""
    panels = [(name, values) for name, values in panels if any(v is not None for vs in values.values() for v in vs)]
    if not labels or not panels:
        return []
    with matplotlib.rc_context(RC):
        fig, axes = _figure(
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
                    ax.barh(y + offset, value, height=height, edgecolor="black", linewidth=0.6, label=slug, **_style(i))
                    ax.text(
                        value, y + offset, f" {value:,.2f}" if value < 10 else f" {value:,.0f}", va="center", fontsize=7
                    )
            ax.set_xlabel(name)
            ax.margins(x=0.15)
        axes[0][0].set_yticks(range(len(labels)), list(reversed(labels)))
        _legend(fig, axes[0])
        fig.suptitle(title)
    return _save(fig, stem, formats)
