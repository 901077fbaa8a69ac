"""optkit report on profiled rows: the kernel-share table (with trace links), the VRAM-over-one-step
figure and the timed-window NVML peak column. Rows are synthetic (tests/golden's row builder) with
profile and NVML-window fields written here, so every expected cell is known."""

import csv
import importlib.util
import re
from pathlib import Path

import pytest

from optkit.measure.profile import CATEGORIES
from optkit.report import command as report
from optkit.report.profile import step_vram_series
from optkit.results.rows import append_row

GIB = 1024**3
GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def _golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHARES = {  # opt -> % per category (CATEGORIES order)
    "baseline": [31.0, 44.0, 0.0, 0.0, 6.0, 4.0, 15.0],
    "full": [36.5, 40.5, 12.26, 0.0, 4.0, 2.0, 4.74],
}


def _share(pcts, step_ms):
    return [{"category": c, "time_ms": round(step_ms * p / 100, 4), "share_pct": p} for c, p in zip(CATEGORIES, pcts)]


def _saw(t0_ms, step_ms, low_gib, high_gib, every_ms=10.0):
    """Samples of one step: memory climbs through forward, falls through backward."""
    out, t = [], 0.0
    while t <= step_ms:
        frac = t / step_ms
        rise = frac / 0.4 if frac < 0.4 else max(0.0, (1 - frac) / 0.6)
        out.append([round(t0_ms + t, 1), int((low_gib + (high_gib - low_gib) * rise) * GIB)])
        t += every_ms
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    g = _golden()
    root = tmp_path_factory.mktemp("results")
    rows = []
    for opt, step_ms, low, high in (("baseline", 900.0, 20.0, 34.0), ("full", 700.0, 16.0, 23.5)):
        row = g.train_row(g.H100, "e2e", "prof-run", "llama3_8b", opt, step_ms=step_ms, peak_alloc_gib=high - 1)
        last = row["step_times_ms"][-1]
        window = [5000.0, 5000.0 + sum(row["step_times_ms"])]
        build = _saw(0.0, 4000.0, 0.5, 40.0, every_ms=50.0)  # the model build's spike, before the window
        steps = _saw(window[1] - last, last, low, high, every_ms=50.0)
        row.update(
            nvml_series=build + steps,
            nvml_timed_window_ms=window,
            peak_nvml_timed_device_bytes=int(high * GIB),
            profile_kernel_share=_share(SHARES[opt], 850.0),
            profile_step_ms=850.0,
            profile_time_source="cuda_kernels",
            trace_path=f"traces/{opt}-r0.json.gz",
            profile_top_kernels=[
                {"name": "nvjet_hsh_256x128_64x4", "category": "matmul", "calls": 224, "total_ms": 340.0}
            ],
        )
        if opt == "baseline":  # full-rate samples of the profiled step; "full" is cut from nvml_series
            row.update(
                nvml_step_series=[[t - 0.0, b] for t, b in _saw(0.0, 880.0, low, high)],
                nvml_step_series_of="profiled_step",
                nvml_profiled_step_ms=[9000.0, 9880.0],
            )
        rows.append(row)
    run = root / "h100" / "e2e" / "prof-run"
    (run / "traces").mkdir(parents=True)
    for row in rows:
        append_row(run / "results.jsonl", row)
        (run / row["trace_path"]).write_bytes(b"\x1f\x8b")
    return run


@pytest.fixture(scope="module")
def out(run_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    assert report.main([str(run_dir), "--out", str(root), "--formats", "png,pdf"]) == 0
    return root / "h100" / "e2e"


def test_kernel_share_table_has_every_category_and_links_the_traces(out):
    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| point | attention %"))
    assert header.split(" | ")[1:8] == [f"{c} %" for c in CATEGORIES]
    full = next(line for line in md.splitlines() if line.startswith("| full ") and "[trace](" in line)
    assert "| 36.5 | 40.5 | 12.3 | 0.0 | 4.0 | 2.0 | 4.7 |" in full  # one decimal
    for link in re.findall(r"\[trace\]\(([^)]+)\)", md):
        assert (out / link).resolve().is_file(), link
    assert len(re.findall(r"\[trace\]\(", md)) == 2
    assert "<summary>top kernels: baseline</summary>" in md and "`nvjet_hsh_256x128_64x4`" in md
    with open(out / "llama3_8b_kernel_share.csv", newline="") as fh:
        table = {r["opt"]: r for r in csv.DictReader(fh)}
    for opt, pcts in SHARES.items():
        assert [float(table[opt][f"share:{c}"]) for c in CATEGORIES] == pcts
    assert r"\toprule" in (out / "llama3_8b_kernel_share.tex").read_text()


def test_vram_over_one_step_figure_is_written_and_embedded(out):
    md = (out / "report.md").read_text()
    assert "](figures/llama3_8b_vram_step.png)" in md
    assert (out / "figures/llama3_8b_vram_step.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "figures/llama3_8b_vram_step.pdf").read_bytes()[:5] == b"%PDF-"


def test_timed_peak_column(out):
    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| opt |"))
    column = header.split(" | ").index("peak NVML timed GiB")
    cells = {
        line.split(" | ")[0]: line.split(" | ")[column]
        for line in md.splitlines()
        if line.startswith(("| baseline | ok |", "| full | ok |"))
    }
    assert cells == {"| baseline": "34.00", "| full": "**23.50**"}


def test_step_series_cut_from_the_point_series():
    series = [[0.0, 9], [100.0, 1], [150.0, 2], [190.0, 5], [200.0, 3], [260.0, 7]]
    # no profile: the window's last step ended at the window's end mark and lasted its last step time
    row = {"nvml_series": series, "nvml_timed_window_ms": [50.0, 200.0], "step_times_ms": [60.0, 55.0]}
    assert step_vram_series(row) == [[5.0, 2], [45.0, 5], [55.0, 3]]
    row["nvml_profiled_step_ms"] = [190.0, 260.0]  # the profiled step wins
    assert step_vram_series(row) == [[0.0, 5], [10.0, 3], [70.0, 7]]
    row["nvml_step_series"] = [[0.0, 4], [10.0, 8]]  # full-rate samples win over a cut
    assert step_vram_series(row) == [[0.0, 4], [10.0, 8]]
    assert step_vram_series({"nvml_series": series}) is None, "no marks: no step to cut"
    assert step_vram_series({}) is None
