"""opt=unsloth on CPU, everything but Unsloth itself: the preset and its exclusivity, the registry entry, what a
machine without unsloth or a GPU is told, the arguments Unsloth's calls get, the parser of its patch message,
the output capture, and the build through a stand-in FastLanguageModel (tests/opt/_fake_unsloth.py) on the
random-weights checkpoint optkit writes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from optkit.bench.checkpoint_cache import ensure_checkpoint
from optkit.config.compose import ConfigError, compose, typed_config
from optkit.models import build_model
from optkit.opt import registry, unsloth_peer
from optkit.report.headline import PEER_SWITCHES
from tests.opt._fake_unsloth import load_module
from tests.train._tiny import one_thread  # noqa: F401

TINY = ["model=tiny_llama", "opt=unsloth", "data.seq_len=32", "train.checkpointing=standard"]
REAL_LINE = "Unsloth 2026.10.9 patched 32 layers with 32 QKV layers, 32 O layers and 32 MLP layers."


def _cfg(*overrides):
    return typed_config(compose([*TINY, *overrides]))


def test_registry_entry_is_a_peer_that_needs_a_gpu_and_unsloth():
    entry = registry.REGISTRY["unsloth"]
    assert entry.peer and entry.config_key == "unsloth" and set(entry.requires) == {"cuda", "unsloth"}
    assert set(PEER_SWITCHES) == set(registry.PEERS), "report/headline.py's peer list must follow the registry"
    assert registry.enabled_names(compose(["opt=unsloth"]).opt) == ["unsloth"]


@pytest.mark.parametrize("extra", ["opt.fused_lora=true", "opt.compile=true", "opt.kernels.rms_norm=true"])
def test_unsloth_runs_alone(extra):
    with pytest.raises(ConfigError, match=f"switch off opt.{extra.split('=')[0][4:]}"):
        compose(["opt=unsloth", extra])


def test_machine_without_gpu_or_unsloth_is_told_what_is_missing(monkeypatch):
    real = registry.importlib.util.find_spec
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None if name == "unsloth" else real(name))
    monkeypatch.setattr(registry.torch.cuda, "is_available", lambda: False)
    missing = " ".join(registry.missing_requirements(compose(["opt=unsloth"]).opt))
    assert "needs a CUDA GPU" in missing and "pip install unsloth unsloth_zoo" in missing


@pytest.mark.parametrize(
    "text, expected",
    [
        (REAL_LINE, {"qkv": 32, "o": 32, "mlp": 32}),
        ("Unsloth: will patch\n" + REAL_LINE.replace("32 O", "0 O"), {"qkv": 32, "o": 0, "mlp": 32}),
        (
            f"{REAL_LINE}\nUnsloth 2026.10.9 patched 2 layers with 2 QKV layers, 2 O layers and 1 MLP layers.",
            {"qkv": 2, "o": 2, "mlp": 1},
        ),
        ("Unsloth: Dropout = 0 is supported for fast patching. You are using dropout = 0.1.", None),
        ("", None),
    ],
)
def test_patched_layer_counts_come_from_its_message(text, expected):
    assert unsloth_peer.patched_layers(text) == expected


def test_captured_output_catches_every_writer():
    """print, os.write on both descriptors and a logging handler made before the capture (holding the old
    stream) all land in the capture, and are echoed to stderr afterwards (own process: pytest swaps streams)."""
    code = textwrap.dedent(
        """
        import logging, os, sys
        from optkit.opt.unsloth_peer import captured_output
        log = logging.getLogger("early"); log.addHandler(logging.StreamHandler(sys.stderr))
        with captured_output() as out:
            print("from print"); os.write(1, b"from fd1\\n"); os.write(2, b"from fd2\\n"); log.warning("from logging")
        assert all(s in out[0] for s in ("from print", "from fd1", "from fd2", "from logging")), out
        print("after: not captured")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "from fd1" in proc.stderr and "after: not captured" in proc.stdout


def test_call_arguments_follow_the_config(tmp_path):
    cfg = _cfg("train=qlora", "train.lora_r=8", "train.checkpointing=offload", "train.seed=3")
    kwargs = unsloth_peer.from_pretrained_kwargs(cfg, tmp_path / "ckpt", accepted={"offload_embedding"})
    assert kwargs["model_name"] == str((tmp_path / "ckpt").resolve()) and kwargs["local_files_only"] is True
    assert kwargs["load_in_4bit"] is True and kwargs["max_seq_length"] == 32 and kwargs["offload_embedding"] is False
    assert "offload_embedding" not in unsloth_peer.from_pretrained_kwargs(cfg, tmp_path, accepted=())
    peft = unsloth_peer.peft_kwargs(cfg)
    assert peft["use_gradient_checkpointing"] == "unsloth" and peft["r"] == 8 and peft["random_state"] == 3
    assert peft["bias"] == "none" and peft["lora_dropout"] == 0.0
    assert unsloth_peer.peft_kwargs(_cfg())["use_gradient_checkpointing"] is True


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["train=full"], "train.method"),
        (["train.checkpointing=offload_double_buffer"], "train.checkpointing"),
        (["train=qlora", "train.qlora_quant_type=fp4"], "NF4"),
        (["data.packing=true"], "data.packing"),
    ],
)
def test_points_its_path_cannot_run_are_named(overrides, says):
    assert says in unsloth_peer.unsupported_reason(_cfg(*overrides))
    assert unsloth_peer.unsupported_reason(_cfg()) is None


def test_build_through_its_calls_trains_from_optkits_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTKIT_CACHE_DIR", str(tmp_path / "cache"))
    fake = load_module(tmp_path / "fake")
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    cfg = _cfg("model.dtype=float32")
    checkpoint = ensure_checkpoint(cfg.model, cfg.train.seed, torch.device("cpu"))
    model, info = unsloth_peer.build_unsloth_model(cfg, checkpoint)
    assert info["unsloth_use_gradient_checkpointing"] is True
    assert unsloth_peer.BUILD["unsloth_patched_layers"] == {"qkv": 2, "o": 2, "mlp": 2}
    assert dict(fake.CALLS)["get_peft_model"]["target_modules"] == list(cfg.train.lora_targets)
    log = unsloth_peer.apply_unsloth(model, cfg.opt)  # (the patcher would first ask for a GPU)
    assert any("patched layers: 2 QKV, 2 O, 2 MLP" in line for line in log), log
    # the same weights as optkit's own build: at step 0 (LoRA B = 0) both compute the same loss
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    reference = build_model(cfg.model, "cpu", seed=cfg.train.seed)(input_ids=ids, labels=ids).loss
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.allclose(loss, reference, rtol=1e-6), (loss, reference)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_apply_refuses_a_model_optkit_built():
    model = build_model(compose(["model=tiny_llama"]).model, "cpu")
    with pytest.raises(ValueError, match="optkit bench opt=unsloth"):
        unsloth_peer.apply_unsloth(model, compose(["opt=unsloth"]).opt)
