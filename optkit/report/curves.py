"""Line figures of a report: a sweep axis (scaling), loss curves, VRAM over a point and over one step. Same
contract as plots.py: entries in, ``<stem>.png`` / ``.pdf`` out, [] when there is nothing to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

from optkit.report.figure_style import (
    COLORS,
    FORMATS,
    GIB,
    RC,
    line_style,
    new_figure,
    peak_gib,
    save,
)


def scaling_lines(entries: Sequence[dict], title: str, stem: Path, formats: Sequence[str] = FORMATS) -> List[Path]:
    """tokens/s and peak memory against sequence length, one line per opt-set; OOM points marked."""
    if len({e.get("seq_len") for e in entries if e.get("seq_len")}) < 2:
        return []
    opts = list(dict.fromkeys(e["opt"] for e in entries))
    with matplotlib.rc_context(RC):
        fig, axes = new_figure(9.0, 3.4, ncols=2)
        panels = [
            (axes[0][0], lambda e: e.get("tokens_per_s"), "tokens/s"),
            (axes[0][1], peak_gib, "peak memory (GiB; NVML, else allocator)"),
        ]
        for ax, value, ylabel in panels:
            for i, opt in enumerate(opts):
                mine = sorted((e for e in entries if e["opt"] == opt and e.get("seq_len")), key=lambda e: e["seq_len"])
                ok = [e for e in mine if value(e) is not None]
                ax.plot([e["seq_len"] for e in ok], [value(e) for e in ok], label=opt, markersize=5, **line_style(i))
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
    return save(fig, stem, formats)


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
            fig, axes = new_figure(7.0, 5.0, nrows=2, sharex=True, height_ratios=[2, 1])
        else:  # nothing to compare with: no empty difference panel
            fig, axes = new_figure(7.0, 3.4)
        top = axes[0][0]
        every = max(1, max(len(v) for v in curves.values()) // 12)
        for i, (label, curve) in enumerate(curves.items()):
            style = line_style(i)
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
    return save(fig, stem, formats)


def vram_timeline(
    series: Dict[str, Sequence[Sequence[float]]], title: str, stem: Path, formats: Sequence[str] = FORMATS
) -> List[Path]:
    """NVML device memory over the point's lifetime ([t_ms, bytes] samples), peak marked."""
    series = {k: v for k, v in series.items() if v and len(v) >= 2}
    if not series:
        return []
    with matplotlib.rc_context(RC):
        fig, axes = new_figure(7.0, 3.4)
        ax = axes[0][0]
        for i, (label, samples) in enumerate(series.items()):
            t = [s[0] / 1e3 for s in samples]
            used = [s[1] / GIB for s in samples]
            style = line_style(i)
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
    return save(fig, stem, formats)


def vram_step(
    series: Dict[str, Sequence[Sequence[float]]], title: str, stem: Path, formats: Sequence[str] = FORMATS
) -> List[Path]:
    """NVML device memory within one training step ([ms since the step began, bytes]), one line per
    opt-set on one axis (the first is the baseline); line style and markers tell them apart in grey."""
    series = {k: v for k, v in series.items() if v and len(v) >= 2}
    if not series:
        return []
    with matplotlib.rc_context(RC):
        fig, axes = new_figure(7.0, 3.6)
        ax = axes[0][0]
        for i, (label, samples) in enumerate(series.items()):
            t = [s[0] for s in samples]
            used = [s[1] / GIB for s in samples]
            style = line_style(i)
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
    return save(fig, stem, formats)
