"""An opt=unsloth point through the runner on CPU: its own process (optkit.bench.unsloth_point) that imports
unsloth before transformers, peft and trl, in a scratch directory, with the offline variables and the sweep's
allocator config; a `skipped` row naming what is missing; the rows' Unsloth fields; the random-weights
checkpoint written once into the cache, never the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from optkit.bench import checkpoint_cache, runner, unsloth_point
from optkit.bench.process import run_process
from optkit.config.compose import compose
from optkit.models import build_model
from optkit.results.rows import read_rows
from tests.opt._fake_unsloth import write_package
from tests.train._tiny import one_thread  # noqa: F401

POINT = ["model=tiny_llama", "opt=unsloth", "train.warmup_steps=1", "train.steps=2", "data.seq_len=16"]
REPO = Path(__file__).resolve().parents[2]


def _sweep(tmp_path, monkeypatch, *extra):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OPTKIT_CACHE_DIR", str(tmp_path / "cache"))
    run_dir = runner.run_sweep([f"bench.results_dir={tmp_path / 'results'}", "bench.progress=false", *POINT, *extra])
    return read_rows(run_dir / "results.jsonl")


def test_without_unsloth_or_gpu_the_row_is_skipped_and_says_why(tmp_path, monkeypatch):
    started = []

    def spy(cmd, env, timeout_s):
        started.append((cmd, env))
        return run_process(cmd, env, timeout_s)

    monkeypatch.setattr(runner, "run_process", spy)
    (row,) = _sweep(tmp_path, monkeypatch, "bench.alloc_conf=expandable_segments:False")
    assert row["status"] == "skipped", row["error"]
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in row["error"]
    ((cmd, env),) = started
    assert cmd[cmd.index("-m") + 1] == "optkit.bench.unsloth_point"
    assert env["HF_HUB_OFFLINE"] == env["UNSLOTH_DISABLE_STATISTICS"] == "1"
    assert env["PYTORCH_ALLOC_CONF"] == env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the stand-in would be asked to train for real")
def test_the_point_process_imports_unsloth_first_in_a_scratch_directory(tmp_path, monkeypatch):
    record = tmp_path / "import.json"
    monkeypatch.setenv("PYTHONPATH", f"{write_package(tmp_path / 'fake')}:{REPO}")
    monkeypatch.setenv("FAKE_UNSLOTH_RECORD", str(record))
    (row,) = _sweep(tmp_path, monkeypatch)
    seen = json.loads(record.read_text())
    assert seen["imported_after"] == [], "transformers / peft / trl were imported before unsloth"
    assert Path(seen["cwd"]) == tmp_path / "cache" / "unsloth-work", "Unsloth's files must stay out of the repo"
    assert seen["env"]["HF_HUB_OFFLINE"] == "1" and seen["env"]["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert row["status"] == "skipped" and "needs a CUDA GPU" in row["error"]
    assert "not installed" not in row["error"], "the stand-in is installed: only the GPU is missing"
    assert "unsloth: imported before transformers, peft, trl" in row["patch_log"]


def test_rows_keep_whole_steps_and_what_unsloth_reported(tmp_path, monkeypatch):
    from optkit.opt import unsloth_peer

    monkeypatch.setattr(
        unsloth_peer, "BUILD", {"unsloth_patched_layers": {"qkv": 2, "o": 2, "mlp": 2}, "unsloth_load_s": 1.5}
    )
    out = tmp_path / "rows.json"
    ok = {
        "status": "ok",
        "first_step_s": 9.0,
        "forward_ms": 1.0,
        "backward_ms": 2.0,
        "optimizer_ms": 0.5,
        "step_ms": 4.0,
    }
    out.write_text(json.dumps([ok, {"status": "oom", "patch_log": []}]))
    unsloth_point.finish_rows(out, "imported before transformers, peft, trl")
    done, failed = json.loads(out.read_text())
    assert done["compile_s"] == 9.0 and done["loss_in_forward"] is True and done["step_ms"] == 4.0
    assert done["forward_ms"] is done["backward_ms"] is done["optimizer_ms"] is None
    assert done["unsloth_patched_layers"] == {"qkv": 2, "o": 2, "mlp": 2} and done["unsloth_load_s"] == 1.5
    assert failed["patch_log"] == ["unsloth: imported before transformers, peft, trl"] and "compile_s" not in failed


def test_path_arguments_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = unsloth_point.absolute_paths(["--config", "p.json", "--out=o.json", "--run-id", "r", "--run-dir", "d"])
    assert argv == [
        "--config",
        str(tmp_path / "p.json"),
        f"--out={tmp_path / 'o.json'}",
        "--run-id",
        "r",
        "--run-dir",
        str(tmp_path / "d"),
    ]


def test_checkpoint_is_written_once_to_the_cache_with_optkits_weights(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("OPTKIT_CACHE_DIR", str(tmp_path))
    model_cfg = compose(["model=tiny_llama"]).model
    path = checkpoint_cache.ensure_checkpoint(model_cfg, seed=5, device=torch.device("cpu"))
    assert path.parent == tmp_path / "checkpoints" and path.name.startswith("tiny_llama-")
    assert REPO not in path.parents
    loaded = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    built = build_model(model_cfg, "cpu", seed=5).state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, built[name]), name
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert len(tokenizer) == loaded.config.vocab_size == 512
    ids = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
    assert len(ids) == 3 and (loaded.config.pad_token_id, loaded.config.eos_token_id) == (0, 1)
    monkeypatch.setattr("optkit.models.build_model", lambda *a, **k: pytest.fail("a complete checkpoint is reused"))
    assert checkpoint_cache.ensure_checkpoint(model_cfg, seed=5, device=torch.device("cpu")) == path
    assert checkpoint_cache.checkpoint_dir(model_cfg, 6, torch.device("cpu")) != path, "the seed is in the key"
