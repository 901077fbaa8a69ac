"""optkit report on a fit run: answers read back from probe rows made by a real search against known limits
(the expected cells come from the limits, not from the report's code), published figures beside, the
honesty check, the markers, and tokens/s labelled as the physical GPU's."""

import csv
import json

from optkit.bench.card import CARDS
from optkit.bench.fit import search_largest
from optkit.report import command as report
from optkit.report.fit import answers

STEP, TOP = 256, 131072
LIMITS = {  # (opt, card) -> the largest seq_len that fits
    ("full_tiled_mlp", "gpu_8gb"): 5000,
    ("full_tiled_mlp", "rtx3060"): 30000,
    ("full_tiled_mlp", "rtx4080"): 38000,  # below Unsloth's 40,724 for 16 GB
    ("baseline", "gpu_8gb"): 300,  # below the range: OOM
    ("baseline", "rtx3060"): 1000,
    ("baseline", "rtx4080"): 2600,
}


def _row(opt, card, mode, seq_len, fits, probe, exceeded=False):
    return {
        "run_id": "fit-test",
        "suite": "fit_quick",
        "gpu_slug": "h100",
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "timestamp": f"2026-12-06T00:00:{probe:02d}+00:00",
        "model": "llama3_8b",
        "train_method": "qlora",
        "opt": opt,
        "checkpointing": "offload" if opt != "baseline" else "standard",
        "optimizer": "adamw_8bit",
        "card": card,
        "card_bytes": CARDS[card].total_bytes,
        "card_mode": mode,
        "fit_search": "seq_len",
        "fit_probe": probe,
        "seq_len": seq_len,
        "batch_size": 1,
        "status": "ok" if fits or exceeded else "oom",
        "card_exceeded": exceeded,
        "tokens_per_s": 1000.0 + seq_len if fits else None,
        "card_peak_bytes": CARDS[card].total_bytes - 2**28 if fits else None,
        "card_note": "speed not emulated: tokens/s measured on NVIDIA H100 80GB HBM3; CUDA context of H100",
        "config": {"suite": {"fit": {"seq_len_max": TOP, "batch_max": 256}}},
    }


def _search_rows(opt, card, limit, mode="cap_and_ballast", flaky_at=None):
    rows, seen = [], {}

    def probe(value):
        seen[value] = seen.get(value, 0) + 1
        fits = value <= limit and not (value == flaky_at and seen[value] == 2)
        rows.append(_row(opt, card, mode, value, fits, len(rows)))
        return fits

    search_largest(probe, 512, TOP, STEP)
    return rows


def _run(tmp_path):
    rows = []
    for (opt, card), limit in LIMITS.items():
        rows += _search_rows(opt, card, limit, flaky_at=(limit // STEP) * STEP if card == "rtx4080" else None)
    answer = (30000 // STEP) * STEP  # the honesty check at 12 GB: the ballast alone agrees for optkit...
    rows += [
        _row("full_tiled_mlp", "rtx3060", "ballast", answer, True, 90),
        _row("full_tiled_mlp", "rtx3060", "ballast", answer + STEP, False, 91),
    ]
    base = (1000 // STEP) * STEP  # ...and fits the emulated failure for HF + peft
    rows += [
        _row("baseline", "rtx3060", "ballast", base, True, 92),
        _row("baseline", "rtx3060", "ballast", base + STEP, True, 93),
    ]
    rows.append(_row("liger", "rtx3060", "cap_and_ballast", 512, False, 0, exceeded=True))  # ran, but over the card
    run_dir = tmp_path / "results/h100/fit_quick/fit-test"
    run_dir.mkdir(parents=True)
    (run_dir / "env.json").write_text(json.dumps({"gpu_name": "NVIDIA H100 80GB HBM3"}))
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir, rows


def test_answers_are_the_known_limits_on_the_grid(tmp_path):
    _, rows = _run(tmp_path)
    found = {(e["opt"], e["card"]): e for e in answers(rows) if e["card_mode"] == "cap_and_ballast"}
    for (opt, card), limit in LIMITS.items():
        expected = (limit // STEP) * STEP if limit >= 512 else None
        if card == "rtx4080":  # its edge fitted once and failed when confirmed: one step lower, marked flaky
            expected -= STEP
            assert found[(opt, card)]["flaky"]
        assert found[(opt, card)]["largest_fit"] == expected, (opt, card)
    liger = found[("liger", "rtx3060")]
    assert liger["largest_fit"] is None and liger["card_exceeded"], "over the card does not fit, though status ok"


def test_report_tables_figure_and_checks(tmp_path):
    run_dir, _ = _run(tmp_path)
    out = tmp_path / "reports"
    assert report.main([str(run_dir), "--out", str(out), "--formats", "png"]) == 0
    md = (out / "h100/fit_quick/report.md").read_text()
    table = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in md.splitlines()
        if line.startswith("| ") and ("optkit" in line or "HF" in line or "Unsloth" in line or "Liger" in line)
    }
    assert table["optkit full_tiled_mlp"][:3] == ["4,864", "29,952", "37,632*"]
    assert table["HF + peft"][:3] == ["OOM", "768", "2,304*"]
    assert table["Liger"][1] == "OOM!"
    assert table["Unsloth (published)"][:3] == ["2,972", "21,848", "40,724"]
    assert table["HF + FA2 (published)"][:3] == ["OOM", "932", "2,551"]
    assert "RTX 3060 12 GB: optkit full_tiled_mlp fits 29,952 tokens, beats Unsloth's published 21,848" in md
    assert "RTX 4080 16 GB: optkit full_tiled_mlp fits 37,632* tokens, is below Unsloth's published 40,724" in md
    honesty = {line.split(" on ")[0]: line for line in md.splitlines() if "ballast alone:" in line}
    assert set(honesty) == {"- optkit full_tiled_mlp", "- HF + peft"}
    assert "agree within one bisection step" in honesty["- optkit full_tiled_mlp"]
    assert "disagree: the ballast alone fits the emulated failure" in honesty["- HF + peft"]
    assert "tokens/s at the fit (physical GPU, not the card)" in md and "(NVIDIA H100 80GB HBM3)" in md
    assert (out / "h100/fit_quick/figures/fit_llama3_8b_qlora_context.png").stat().st_size > 1000
    with open(out / "h100/fit_quick/fit.csv") as fh:
        assert {
            r["largest_fit"] for r in csv.DictReader(fh) if r["card"] == "rtx3060" and r["opt"] == "full_tiled_mlp"
        } == {"29952"}
