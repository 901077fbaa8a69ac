"""The examples a user copies run as a user runs them (a fresh process, CPU, a tiny model) and print their one
JSON line, also into $OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("example", ["hf_trainer", "trl_sft"])
def test_example_runs_and_reports(example, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, f"examples/{example}.py", "--steps", "3", "--warmup-steps", "1", "--max-length", "12"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    written = [json.loads(line) for line in (tmp_path / f"{example}.jsonl").read_text().splitlines()]
    assert written == [printed]
    assert printed["example"] == example and printed["model"] == "tiny_llama" and printed["opt"] == "full"
    assert len(printed["losses"]) == 3 and printed["timed_steps"] == 2 and printed["tokens_per_s"] > 0
    assert any(line.startswith("fused_lora: QKV+O fused in 2/2 layers") for line in printed["optkit"])
    trl_note = any("fused_lm_head=True (TRL's SFTTrainer)" in line for line in printed["optkit"])
    assert trl_note == (example == "trl_sft"), printed["optkit"]
