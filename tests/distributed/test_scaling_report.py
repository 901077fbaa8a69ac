"""The report's scaling section on made-up rows of 1, 2 and 4 GPUs: efficiency is per-GPU tokens/s over the
same series' 1-GPU point, series never mix, a failed point keeps its status, no 1-GPU row means no efficiency."""

import csv
import json

from omegaconf import OmegaConf

from optkit.config.compose import compose
from optkit.report.scaling import scaling_entries
from optkit.report.sections import write_report
from optkit.results.rows import empty_row, identity_fields
from optkit.results.runs import group_points, load_run


def _row(gpus, per_gpu, method="lora", status="ok"):
    overrides = [f"train={method}", "train.distributed=fsdp2", f"bench.gpus={gpus}"]
    config = OmegaConf.to_container(compose(overrides), resolve=True)
    row = empty_row()
    row.update(identity_fields(config, overrides, "run", 0))
    row.update(status=status, gpu_slug="h100", timestamp=f"2026-01-0{gpus}T00:00:00")
    if status == "ok":
        row.update(
            tokens_per_s=per_gpu * gpus,
            tokens_per_s_per_gpu=per_gpu,
            step_ms=100.0,
            step_times_ms=[100.0, 100.0],
            peak_allocated_bytes=2**30,
        )
    else:
        row["error"] = "CUDA out of memory"
    return row


def test_efficiency_is_per_gpu_throughput_over_the_one_gpu_point():
    rows = [_row(1, 1000.0), _row(2, 900.0), _row(4, 750.0), _row(4, 0, method="full", status="oom")]
    rows.append(_row(2, 500.0, method="full"))  # a series with no 1-GPU ok row
    entries = scaling_entries(group_points(rows))
    lora = {e["gpus"]: e for e in entries if "/lora/" in e["series"]}
    assert [lora[n]["efficiency"] for n in (1, 2, 4)] == [1.0, 0.9, 0.75]
    assert lora[4]["tokens_per_s"] == 3000.0
    full = {e["gpus"]: e for e in entries if "/full/" in e["series"]}
    assert full[4]["status"] == "oom" and full[4]["efficiency"] is None
    assert full[2]["efficiency"] is None  # no 1-GPU point: no efficiency, never a guess
    assert all(not e["series"].endswith(("-x1", "-x2", "-x4")) for e in entries)


def test_report_has_a_scaling_section_and_table(tmp_path):
    run_dir = tmp_path / "results" / "h100" / "gpu_scaling" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "env.json").write_text(json.dumps({"gpu_name": "NVIDIA H100 80GB HBM3"}))
    rows = [_row(1, 1000.0), _row(2, 950.0)]
    for row in rows:
        row["suite"] = "gpu_scaling"
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report([load_run(run_dir)], tmp_path / "reports", formats=("png",))
    text = report.read_text()
    assert "## Scaling over GPUs" in text and "95%" in text
    table = list(csv.DictReader((report.parent / "scaling.csv").open()))
    assert [float(r["efficiency"]) for r in table] == [1.0, 0.95]
