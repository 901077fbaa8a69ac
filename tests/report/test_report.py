"""optkit report on the golden runs (tests/golden, written by tests/golden/make_golden.py).

Expected numbers are recomputed here from the raw rows with numpy, independently of report.py.
"""

import csv
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from optkit.report import command as report
from optkit.report import entries
from optkit.report.cross_gpu import write_cross_gpu
from optkit.results.runs import load_run

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
SMOKE = GOLDEN / "cpu/smoke/golden-smoke"
ABLATION = GOLDEN / "h100/ablation/golden-ablation"
SCALING = GOLDEN / "h100/scaling/golden-scaling"
KERNELS = GOLDEN / "h100/kernels/golden-kernels"
CONVERGENCE = GOLDEN / "h100/convergence/golden-convergence"
E2E_H100 = GOLDEN / "h100/e2e/golden-e2e-h100"
E2E_H200 = GOLDEN / "h200/e2e/golden-e2e-h200"
GIB = 1024**3


def load_make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Every golden run reported once. Drawing figures is the slow part, so smoke and e2e get tables only;
    the cross-GPU figure and PDF output have their own tests."""
    root = tmp_path_factory.mktemp("reports")
    assert report.main([str(SMOKE), str(E2E_H100), str(E2E_H200), "--out", str(root), "--formats", ""]) == 0
    runs = [ABLATION, SCALING, KERNELS, CONVERGENCE]
    assert report.main([*map(str, runs), "--out", str(root), "--formats", "png"]) == 0
    return root


def read_csv(path: Path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def rows_of(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip()]


def test_golden_runs_are_reproducible(tmp_path):
    load_make_golden().build_all(tmp_path)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(GOLDEN) for p in GOLDEN.rglob("*") if p.is_file() and p.parent != GOLDEN)
    assert written == committed
    for rel in written:
        assert (tmp_path / rel).read_bytes() == (GOLDEN / rel).read_bytes(), rel


def test_every_report_and_table_exists(out):
    expected = {
        "cpu/smoke": ["tiny_llama", "tiny_qwen3", "tiny_gemma2", "tiny_qwen3_moe"],
        "h100/ablation": ["llama3_8b"],
        "h100/scaling": ["llama3_8b"],
        "h100/kernels": ["kernels"],
        "h100/convergence": ["llama3_2_1b"],
        "h100/e2e": ["llama3_8b"],
        "h200/e2e": ["llama3_8b"],
        "cross-gpu/e2e": ["cross_gpu"],
    }
    for folder, tables in expected.items():
        assert (out / folder / "report.md").is_file(), folder
        for name in tables:
            assert (out / folder / f"{name}.csv").is_file() and (out / folder / f"{name}.tex").is_file()


def test_figures_exist_and_are_embedded(out):
    expected = {
        "h100/ablation": ["llama3_8b_speedup", "llama3_8b_phases", "llama3_8b_memory", "llama3_8b_vram"],
        "h100/scaling": ["llama3_8b_scaling"],
        "h100/kernels": ["kernels_bandwidth"],
        "h100/convergence": ["llama3_2_1b_loss"],
    }
    for folder, names in expected.items():
        md = (out / folder / "report.md").read_text()
        for name in names:
            png = out / folder / "figures" / f"{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
            assert f"](figures/{name}.png)" in md
    assert not list((out / "cpu/smoke").glob("figures/*")), "--formats '' must write no figure"


def test_cross_gpu_figure(tmp_path):
    per_gpu = {"h100": [load_run(E2E_H100)], "h200": [load_run(E2E_H200)]}
    md_path = write_cross_gpu(per_gpu, tmp_path, formats=("png",))
    assert (md_path.parent / "figures/cross_gpu.png").read_bytes()[:4] == b"\x89PNG"
    assert "](figures/cross_gpu.png)" in md_path.read_text()


def test_pdf_figures(tmp_path):
    assert report.main([str(KERNELS), "--out", str(tmp_path), "--formats", "png,pdf"]) == 0
    pdf = tmp_path / "h100/kernels/figures/kernels_bandwidth.pdf"
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_environment_block(out):
    md = (out / "h100/ablation/report.md").read_text()
    for fact in (
        "NVIDIA H100 80GB HBM3",
        "580.65.06",
        "2.11.0+cu130",
        "3.6.0",
        "5.17.0",
        "0123abc4567def",
        "golden-ablation",
    ):
        assert fact in md


def test_failed_points_are_rows_not_dropped(out):
    ablation = {r["opt"]: r for r in read_csv(out / "h100/ablation/llama3_8b.csv")}
    assert ablation["only_moe_sorted_routing"]["status"] == "skipped"
    assert ablation["full_minus_checkpointing"]["status"] == "oom"
    assert "out of memory" in ablation["full_minus_checkpointing"]["error"]
    md = (out / "h100/ablation/report.md").read_text()
    assert re.search(r"\| full_minus_checkpointing \| oom \|", md)
    assert re.search(r"\| only_moe_sorted_routing \| skipped \|", md)
    smoke = {r["opt"]: r for r in read_csv(out / "cpu/smoke/tiny_qwen3_moe.csv")}
    assert smoke["kernels"]["status"] == "error" and "shape mismatch" in smoke["kernels"]["error"]
    assert "| kernels | error |" in (out / "cpu/smoke/report.md").read_text()
    kernels = {r["point_key"]: r for r in read_csv(out / "h100/kernels/kernels.csv")}
    assert kernels["rope/liger/bfloat16/8192x4096"]["status"] == "skipped"


def test_speedup_and_memory_match_the_raw_rows(out):
    rows = rows_of(ABLATION)
    steps = {}
    for r in rows:
        if r["status"] == "ok":
            steps.setdefault(r["opt"], []).extend(r["step_times_ms"])
    table = {r["opt"]: r for r in read_csv(out / "h100/ablation/llama3_8b.csv")}
    for opt in ("full", "only_rope", "full_minus_fused_lora"):
        expected = np.median(steps["baseline"]) / np.median(steps[opt])  # same tokens per step
        got = float(table[opt]["speedup"])
        assert got == pytest.approx(expected, rel=1e-9)
        assert float(table[opt]["speedup_ci95_low"]) < got < float(table[opt]["speedup_ci95_high"])
        tokens_per_s = 4096 / (np.median(steps[opt]) / 1e3)
        assert float(table[opt]["tokens_per_s"]) == pytest.approx(tokens_per_s, rel=1e-9)
    nvml = {r["opt"]: r["peak_nvml_process_bytes"] for r in rows if r["status"] == "ok" and r["repeat"] == 0}
    assert float(table["full"]["mem_saving"]) == pytest.approx(1 - nvml["full"] / nvml["baseline"], rel=1e-9)
    assert table["baseline"]["speedup"] == "1.0" and table["baseline"]["speedup_note"] == "reference"


def md_table(md: str, first_header: str):
    """The Markdown table whose header starts with ``first_header``, as a list of dicts."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    body = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        body.append(dict(zip(header, (c.strip() for c in line.strip("|").split(" | ")))))
    return body


def test_best_value_is_bold_and_nowhere_else(out):
    full_steps = [t for r in rows_of(ABLATION) if r["opt"] == "full" for t in r["step_times_ms"]]
    highest = f"{4096 / (np.median(full_steps) / 1e3):,.0f}"  # full is the fastest opt-set of the golden run
    md = (out / "h100/ablation/report.md").read_text()
    table = {r["opt"]: r for r in md_table(md, "opt")}
    assert table["full"]["tokens/s"] == f"**{highest}**"
    assert all(not r["tokens/s"].startswith("**") for opt, r in table.items() if opt != "full")
    assert table["full"]["speedup [95% CI]"].startswith("**1.28×")
    assert all(not r["opt ms"].startswith("**") for r in table.values()), "equal values are not 'best'"
    tex = (out / "h100/ablation/llama3_8b.tex").read_text()
    assert rf"\textbf{{{highest}}}" in tex and tex.count(r"\textbf{") == md.count("**") // 2


def test_scaling_labels_gains_where_the_baseline_failed(out):
    rows = {(r["opt"], r["setting_short"]): r for r in read_csv(out / "h100/scaling/llama3_8b.csv")}
    assert rows[("baseline", "s16384")]["status"] == "oom"
    assert rows[("full", "s16384")]["speedup"] == "" and rows[("full", "s16384")]["speedup_note"] == "baseline oom"
    assert "— (baseline oom)" in (out / "h100/scaling/report.md").read_text()


def test_kernel_speedup_is_vs_eager(out):
    rows = {(r["op"], r["impl"]): r for r in rows_of(KERNELS) if r["status"] == "ok"}
    table = {(r["op"], r["impl"]): r for r in read_csv(out / "h100/kernels/kernels.csv")}
    for op in ("rms_norm", "cross_entropy"):
        expected = np.median(rows[(op, "eager")]["full_times_ms"]) / np.median(rows[(op, "optkit")]["full_times_ms"])
        assert float(table[(op, "optkit")]["speedup"]) == pytest.approx(expected, rel=1e-9)
        gbps = rows[(op, "optkit")]["bytes_full"] / (np.median(rows[(op, "optkit")]["full_times_ms"]) * 1e-3) / 1e9
        assert float(table[(op, "optkit")]["gbps_full"]) == pytest.approx(gbps, rel=1e-9)
    assert "2,950 GB/s" in (out / "h100/kernels/report.md").read_text()


def test_convergence_states_the_max_gap(out):
    curves = {r["opt"]: np.array(r["loss_curve"]) for r in rows_of(CONVERGENCE)}
    gap = np.abs(curves["full"] - curves["baseline"])
    md = (out / "h100/convergence/report.md").read_text()
    row = next(r for r in md_table(md, "point") if r["point"] == "full")
    assert row["steps"] == "300"
    assert float(row["max abs gap"]) == pytest.approx(gap.max(), rel=1e-2)
    assert int(row["at step"]) == int(gap.argmax())


def test_cross_gpu_table(out):
    table = {r["label"]: r for r in read_csv(out / "cross-gpu/e2e/cross_gpu.csv")}
    assert set(table) == {"baseline", "compile", "liger", "full", "full_compile"}
    h100 = {r["opt"]: r["step_times_ms"] for r in rows_of(E2E_H100)}
    h200 = {r["opt"]: r["step_times_ms"] for r in rows_of(E2E_H200)}
    for opt in table:
        assert float(table[opt]["ratio@h200"]) == pytest.approx(np.median(h100[opt]) / np.median(h200[opt]), rel=1e-9)
        assert float(table[opt]["tokens_per_s@h100"]) > 0 and float(table[opt]["tokens_per_s@h200"]) > 0
    md = (out / "cross-gpu/e2e/report.md").read_text()
    assert "tokens/s h100" in md and "tokens/s h200" in md and "NVIDIA H200" in md


def _strip_escapes(tex: str) -> str:
    return re.sub(r"\\[{}&%$#_]", "", tex)


@pytest.mark.parametrize(
    "table",
    [
        "h100/ablation/llama3_8b.tex",
        "h100/scaling/llama3_8b.tex",
        "h100/kernels/kernels.tex",
        "cpu/smoke/tiny_qwen3_moe.tex",
        "cross-gpu/e2e/cross_gpu.tex",
    ],
)
def test_latex_is_a_balanced_booktabs_tabular(out, table):
    tex = (out / table).read_text()
    body = _strip_escapes(tex)
    assert body.count("{") == body.count("}")
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1
    spec = re.search(r"\\begin\{tabular\}\{([^}]*)\}", tex).group(1).split()
    lines = tex.split(r"\toprule")[1].split(r"\bottomrule")[0].splitlines()
    rows = [line for line in lines if line.strip().endswith(r"\\")]
    assert len(rows) >= 3
    for line in rows:
        assert _strip_escapes(line).count("&") == len(spec) - 1, line
    assert "_" not in body.replace(r"\_", "")  # every underscore escaped


@pytest.mark.skipif(
    shutil.which("pdflatex") is None,
    reason="pdflatex not installed (Debian: texlive-latex-recommended); only the compile is skipped, the .tex "
    "tables' structure is checked by test_latex_is_a_balanced_booktabs_tabular",
)
def test_latex_compiles(out, tmp_path):
    tables = [out / "h100/ablation/llama3_8b.tex", out / "h100/kernels/kernels.tex"]
    doc = tmp_path / "doc.tex"
    doc.write_text(
        "\\documentclass{article}\n\\usepackage{booktabs,graphicx}\n\\begin{document}\n"
        + "".join(f"\\resizebox{{\\textwidth}}{{!}}{{\\input{{{t}}}}}\n\n" for t in tables)
        + "\\end{document}\n"
    )
    proc = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_runs_of_one_gpu_and_suite_newest_or_merged(tmp_path, capsys):
    later = tmp_path / "runs/h100/e2e/golden-e2e-h100-later"
    shutil.copytree(E2E_H100, later)
    (later / "results.jsonl").write_text(
        (later / "results.jsonl")
        .read_text()
        .replace('"run_id": "golden-e2e-h100"', '"run_id": "golden-e2e-h100-later"')
    )
    assert report.main([str(later), str(E2E_H100), "--out", str(tmp_path / "one"), "--formats", ""]) == 0
    assert "reporting the newest run golden-e2e-h100-later" in capsys.readouterr().err
    assert "`golden-e2e-h100-later`" in (tmp_path / "one/h100/e2e/report.md").read_text()
    table = {r["opt"]: r for r in read_csv(tmp_path / "one/h100/e2e/llama3_8b.csv")}
    assert table["full"]["windows"] == "1"
    assert report.main([str(E2E_H100), str(later), "--merge", "--out", str(tmp_path / "all"), "--formats", ""]) == 0
    table = {r["opt"]: r for r in read_csv(tmp_path / "all/h100/e2e/llama3_8b.csv")}
    assert table["full"]["windows"] == "2" and table["full"]["steps"] == "40"


def test_unusable_input_exits_2(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "no results.jsonl" in capsys.readouterr().err
    assert report.main([str(GOLDEN / "h100"), "--out", str(tmp_path)]) == 2
    assert "golden-ablation" in capsys.readouterr().err  # lists the run directories below it


def test_a_baseline_list_gives_each_model_its_own_reference():
    class P:
        def __init__(self, opt):
            self.head = {"opt": opt}

    moe = [P("hf_loop"), P("hf_grouped_mm"), P("optkit_sorted")]
    packing = [P("packed_per_layer"), P("packed_cached")]
    assert entries.model_baseline_opt("packed_per_layer,hf_loop", moe) == "hf_loop"
    assert entries.model_baseline_opt("packed_per_layer,hf_loop", packing) == "packed_per_layer"
    assert entries.model_baseline_opt("baseline", moe) == "baseline"  # absent: no speedups, as before


def test_memory_saving_prefers_the_timed_nvml_peak_over_the_build_peak():
    """QLoRA rows: the build holds the bf16 model before quantizing it, so the whole-process NVML peak is
    the same for every opt-set; the saving must come from the timed window when both points have it."""
    from optkit.report.entries import train_entry
    from optkit.results.runs import Point

    def point(opt, timed_gib, process_gib=16.0):
        row = dict(
            status="ok",
            opt=opt,
            model="m",
            setting_key="m/qlora",
            step_times_ms=[100.0, 101.0],
            tokens_per_step=4096,
            peak_nvml_process_bytes=process_gib * 2**30,
            peak_allocated_bytes=process_gib / 3 * 2**30,
        )
        if timed_gib is not None:
            row["peak_nvml_timed_device_bytes"] = timed_gib * 2**30
        return Point(f"m/{opt}", [row])

    base = point("baseline", 16.0)
    entry = train_entry(point("full", 9.0), base)
    assert (
        entry["mem_saving"] == pytest.approx(1 - 9.0 / 16.0) and entry["mem_saving_source"] == "peak_nvml_timed_bytes"
    )
    older = train_entry(point("full", None, process_gib=12.0), point("baseline", None))  # rows without a timed peak
    assert older["mem_saving"] == pytest.approx(1 - 12.0 / 16.0) and older["mem_saving_source"] == "peak_nvml_bytes"
