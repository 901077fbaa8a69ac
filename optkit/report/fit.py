"""Reports of fit suites (suite.kind=fit): per model, training method and search, the largest point each stack
fits on each emulated card, read back from the probes' rows (optkit/bench/fit.py's ``summarize``): a table
of cards x stacks with the published figures beside, the figure "largest context on each card", the long
table (tokens/s at the answer, the card's peak, probes, notes) and the emulation's honesty check.

Speed is not emulated: tokens/s at an answer are the physical GPU's (the row's ``gpu_name``), labelled so and
never as the small card's. A cell marked * had a flaky or contradicting probe (fitting was not monotone
there); ! means NVML saw a probe use more than its card (that probe counts as not fitting).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

from optkit.bench.card import CARDS
from optkit.bench.fit import probe_fits, summarize
from optkit.report.figure_style import GIB, RC, bar_style, legend, new_figure, save
from optkit.report.sections import environment_block
from optkit.report.tables import DASH, write_csv
from optkit.results.runs import Run

# Llama-3.1-8B, QLoRA r=32, batch 1: the longest context (tokens) per card size in GB, from Unsloth's docs
# (../shared/PEERS.md). None: out of memory at any length.
PUBLISHED = {
    "Unsloth (published)": {8: 2972, 12: 21848, 16: 40724, 24: 78475, 40: 153977, 48: 191728, 80: 342733},
    "HF + FA2 (published)": {8: None, 12: 932, 16: 2551, 24: 5789, 40: 12264, 48: 15502, 80: 28454},
}
PUBLISHED_FOR = ("qlora", "seq_len")  # the method and search the published figures are
STACK_NAMES = {"baseline": "HF + peft", "liger": "Liger", "unsloth": "Unsloth"}
EMULATED = "cap_and_ballast"


def is_fit_run(runs: Sequence[Run]) -> bool:
    return any(row.get("fit_search") for run in runs for row in run.rows)


def stack_name(opt: str) -> str:
    return STACK_NAMES.get(opt, f"optkit {opt}")


def card_gb(row: Dict[str, Any]) -> Optional[int]:
    card = CARDS.get(row.get("card") or "")
    if card is not None:
        return card.gb
    return round(row["card_bytes"] / GIB) if row.get("card_bytes") else None


def _value(row: Dict[str, Any]) -> int:
    return int(row["seq_len"] if row["fit_search"] == "seq_len" else row["batch_size"])


def _top(row: Dict[str, Any]) -> Optional[int]:
    fit = ((row.get("config") or {}).get("suite") or {}).get("fit") or {}
    return fit.get("seq_len_max") if row["fit_search"] == "seq_len" else fit.get("batch_max")


def answers(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One entry per (model, method, stack settings, card, card mode, search): its answer and the probes'."""
    groups: Dict[Tuple, List[Dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("fit_search"):
            key = tuple(
                row.get(k)
                for k in (
                    "model",
                    "train_method",
                    "opt",
                    "checkpointing",
                    "optimizer",
                    "card",
                    "card_mode",
                    "fit_search",
                )
            )
            groups[key].append(row)
    entries = []
    for key, probes in groups.items():
        model, method, opt, ckpt, optimizer, card, mode, search = key
        found = summarize([(_value(r), probe_fits(r)) for r in probes])
        at_answer = [r for r in probes if _value(r) == found.largest_fit and probe_fits(r)]
        head = at_answer[-1] if at_answer else probes[-1]
        speeds = [r["tokens_per_s"] for r in at_answer if r.get("tokens_per_s")]  # one timed step each
        entries.append(
            {
                "model": model,
                "method": method,
                "opt": opt,
                "stack": stack_name(opt),
                "checkpointing": ckpt,
                "optimizer": optimizer,
                "card": card,
                "card_gb": card_gb(head),
                "card_bytes": head.get("card_bytes"),
                "card_mode": mode,
                "search": search,
                "largest_fit": found.largest_fit,
                "smallest_failure": found.smallest_failure,
                "top": _top(head),
                "probes": len(found.probes),
                "flaky": found.flaky,
                "contradictions": found.contradictions,
                "card_exceeded": any(r.get("card_exceeded") for r in probes),
                "tokens_per_s_physical": speeds[-1] if speeds else None,
                "measured_on": head.get("gpu_name"),
                "card_peak_bytes": head.get("card_peak_bytes") if at_answer else None,
                "card_note": head.get("card_note"),
                "skipped": next((r.get("error") for r in probes if probe_fits(r) is None), None),
            }
        )
    return sorted(entries, key=lambda e: (e["model"], e["method"], e["search"], e["stack"], e["card_bytes"] or 0))


def answer_cell(entry: Optional[Dict[str, Any]]) -> str:
    if entry is None:
        return DASH
    if entry["skipped"] and entry["largest_fit"] is None:
        return "skipped"
    text = "OOM" if entry["largest_fit"] is None else f"{entry['largest_fit']:,}"
    if entry["smallest_failure"] is None and entry["largest_fit"] is not None:  # nothing above failed (yet)
        text = f"≥ {text}"
    if entry["flaky"] or entry["contradictions"]:
        text += "*"
    return text + ("!" if entry["card_exceeded"] else "")


def _cards(entries: Sequence[Dict[str, Any]]) -> List[Tuple[str, Optional[int]]]:
    seen = {(e["card"], e["card_gb"]): e["card_bytes"] or 0 for e in entries}
    return sorted(seen, key=seen.get)


def _card_header(card: str, gb: Optional[int]) -> str:
    return CARDS[card].label if card in CARDS else f"{card} ({gb} GB)"


def pivot(entries: Sequence[Dict[str, Any]], method: str, search: str) -> Tuple[List[str], List[List[str]]]:
    """(header, rows) of the cards x stacks table of one method and search, published figures beside."""
    cards = _cards(entries)
    by_stack: Dict[str, Dict[str, Dict[str, Any]]] = defaultdict(dict)
    for e in entries:
        by_stack[e["stack"]][e["card"]] = e
    header = ["stack"] + [_card_header(card, gb) for card, gb in cards]
    rows = [[stack] + [answer_cell(found.get(card)) for card, _ in cards] for stack, found in by_stack.items()]
    if (method, search) == PUBLISHED_FOR:
        for name, figures in PUBLISHED.items():
            rows.append([name] + [_published_cell(figures, gb) for _, gb in cards])
    return header, rows


def _published_cell(figures: Dict[int, Optional[int]], gb: Optional[int]) -> str:
    if gb not in figures:
        return DASH
    return "OOM" if figures[gb] is None else f"{figures[gb]:,}"


def _count(value: Optional[int]) -> str:
    return DASH if value is None else f"{value:,}"


def _markdown(header: List[str], rows: List[List[str]], text_columns: int = 1) -> List[str]:
    align = ":---|" * text_columns + "---:|" * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + align]
    return lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def versus_published(entries: Sequence[Dict[str, Any]]) -> List[str]:
    """optkit's QLoRA context per card against Unsloth's published figure for that card size."""
    lines = []
    for e in entries:
        if (e["method"], e["search"]) != PUBLISHED_FOR or e["opt"] in STACK_NAMES or e["card_mode"] != EMULATED:
            continue
        figure = PUBLISHED["Unsloth (published)"].get(e["card_gb"])
        if figure is None or e["largest_fit"] is None:
            continue
        verdict = "beats" if e["largest_fit"] > figure else "matches" if e["largest_fit"] == figure else "is below"
        lines.append(
            f"- {_card_header(e['card'], e['card_gb'])}: {e['stack']} fits {answer_cell(e)} tokens, {verdict} "
            f"Unsloth's published {figure:,}"
        )
    return lines


def honesty(entries: Sequence[Dict[str, Any]], rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Emulated (allocator cap + ballast) vs a ballast alone on the same card: the ballast-only probes at the
    emulated answer and failure fit and fail the same way (agree within one bisection step), or say how not."""
    lines = []
    for e in entries:
        if e["card_mode"] != EMULATED or e["largest_fit"] is None:
            continue
        ballast = [
            r
            for r in rows
            if r.get("fit_search") == e["search"]
            and r.get("card_mode") == "ballast"
            and (r.get("model"), r.get("train_method"), r.get("opt"), r.get("card"))
            == (e["model"], e["method"], e["opt"], e["card"])
        ]
        if not ballast:
            continue
        outcome = {_value(r): probe_fits(r) for r in ballast}
        at_fit, at_failure = outcome.get(e["largest_fit"]), outcome.get(e["smallest_failure"])
        if at_fit and e["smallest_failure"] is None:
            verdict = "the ballast alone fits the emulated answer too (no failure above it measured yet)"
        elif at_fit and at_failure is not True:
            verdict = "agree within one bisection step"
        elif at_fit is False:
            verdict = "disagree: the ballast alone does not fit the emulated answer (noise, or the cap changed packing)"
        else:
            verdict = "disagree: the ballast alone fits the emulated failure too (the cap and reserve are stricter)"
        lines.append(
            f"- {e['stack']} on {_card_header(e['card'], e['card_gb'])} ({e['search']}): emulated fits "
            f"{e['largest_fit']:,}, fails {_count(e['smallest_failure'])}; ballast alone: "
            + ", ".join(f"{v:,} {'fits' if f else 'fails'}" for v, f in sorted(outcome.items()))
            + f" — {verdict}"
        )
    return lines


def context_bars(entries: Sequence[Dict[str, Any]], title: str, stem: Path, formats: Sequence[str]) -> List[Path]:
    """Grouped bars, one group per card, one bar per stack (and Unsloth's published figure), log scale."""
    cards = _cards(entries)
    stacks = list(dict.fromkeys(e["stack"] for e in entries))
    series = {s: {e["card"]: e["largest_fit"] for e in entries if e["stack"] == s} for s in stacks}
    published = {card: PUBLISHED["Unsloth (published)"].get(gb) for card, gb in cards}
    if any(published.values()):
        series["Unsloth (published)"] = published
    if not any(v for values in series.values() for v in values.values()):
        return []
    width = 0.8 / len(series)
    floor = min(v for values in series.values() for v in values.values() if v) / 4  # where an OOM bar's note sits
    with matplotlib.rc_context(RC):
        fig, axes = new_figure(max(6.4, 1.2 + 1.2 * len(cards)), 4.0)
        ax = axes[0][0]
        for i, (name, values) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(cards))]
            heights = [values.get(card) or 0 for card, _ in cards]
            ax.bar(xs, heights, width, label=name, edgecolor="black", linewidth=0.4, **bar_style(i))
            for x, (card, _) in zip(xs, cards):
                if card in values and not values[card]:
                    ax.text(
                        x, floor * 1.1, "OOM", rotation=90, va="bottom", ha="center", fontsize=7, fontstyle="italic"
                    )
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        labels = [_card_header(card, gb).rsplit(" ", 2) for card, gb in cards]  # "RTX 3060\n12 GB"
        labels = [f"{parts[0]}\n{' '.join(parts[1:])}" if len(parts) == 3 else " ".join(parts) for parts in labels]
        ax.set_xticks(range(len(cards)), labels)
        ax.set_ylabel("largest context (tokens, batch 1)")
        ax.set_title(title)
        legend(fig, [ax])
    return save(fig, stem, formats)


def write_fit_report(
    runs: Sequence[Run], out_root: Path, baseline_opt: Optional[str] = None, formats: Sequence[str] = ("png", "pdf")
) -> Path:
    """reports/<slug>/<suite>/report.md (+ fit.csv, figures) for fit runs of one GPU kind and suite."""
    slug, suite = runs[0].gpu_slug, runs[0].suite
    out_dir = Path(out_root) / slug / suite
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    rows = [row for run in runs for row in run.rows]
    entries = answers(rows)
    gpu = runs[0].value("gpu_name") or "the physical GPU"
    md = [
        f"# optkit report: what fits on each card, suite `{suite}` (emulated on {gpu})",
        "",
        environment_block(runs),
        "",
        "Each cell: the largest value that fitted every time it was probed, on an emulated card (allocator capped, "
        "the rest of the GPU held as ballast, NVML-checked); OOM: nothing in the range fitted; ≥: nothing larger "
        "failed (the range's top fitted, or the search stopped early). * a flaky or contradicting probe (not "
        "monotone there); ! NVML saw a probe exceed its card. "
        f"Every probe is a row of the run. Memory is the card's; speed is not: tokens/s are {gpu}'s.",
        "",
    ]
    emulated = [e for e in entries if e["card_mode"] == EMULATED]
    for (model, method, search), group in _groups(emulated).items():
        what = "context at batch 1" if search == "seq_len" else "batch at the fit's tokens per row"
        md += [f"## {model}, {method}: largest {what}", ""]
        md += _markdown(*pivot(group, method, search)) + [""]
        if search == "seq_len":
            name = f"fit_{model}_{method}_context"
            paths = context_bars(
                group, f"{model} {method}: largest context on each card", out_dir / "figures" / name, formats
            )
            png = next((p for p in paths if p.suffix == ".png"), None)
            md += [f"![largest context on each card](figures/{png.name})", ""] if png else []
    lines = versus_published(entries)
    if lines:
        md += ["## Against the published figures", ""] + lines + [""]
    lines = honesty(entries, rows)
    if lines:
        md += ["## Is the emulation honest? (allocator cap + ballast vs a ballast alone)", ""] + lines + [""]
    md += ["## Every answer", "", *_long_table(entries), "", "Table: [fit.csv](fit.csv)"]
    write_csv(out_dir / "fit.csv", entries)
    (out_dir / "report.md").write_text("\n".join(md).rstrip() + "\n")
    return out_dir / "report.md"


def _groups(entries: Sequence[Dict[str, Any]]) -> Dict[Tuple[str, str, str], List[Dict[str, Any]]]:
    groups: Dict[Tuple[str, str, str], List[Dict[str, Any]]] = defaultdict(list)
    for e in entries:
        groups[(e["model"], e["method"], e["search"])].append(e)
    return groups


def _long_table(entries: Sequence[Dict[str, Any]]) -> List[str]:
    header = [
        "model / method / search",
        "stack",
        "card (mode)",
        "largest fit",
        "smallest failure",
        "probes",
        "tokens/s at the fit (physical GPU, not the card)",
        "card peak GiB",
        "notes",
    ]
    rows = []
    for e in entries:
        speed = f"{e['tokens_per_s_physical']:,.0f} ({e['measured_on']})" if e["tokens_per_s_physical"] else DASH
        peak = f"{e['card_peak_bytes'] / GIB:.2f}" if e["card_peak_bytes"] else DASH
        notes = e["skipped"] or (e["card_note"] or "").split("; ", 1)[-1]
        rows.append(
            [
                f"{e['model']} / {e['method']} / {e['search']}",
                f"{e['stack']} ({e['checkpointing']}, {e['optimizer']})",
                f"{_card_header(e['card'], e['card_gb'])} ({e['card_mode']})",
                answer_cell(e),
                _count(e["smallest_failure"]),
                e["probes"],
                speed,
                peak,
                notes or DASH,
            ]
        )
    return _markdown(header, rows, text_columns=3)
