"""A local checkpoint of a zoo model's random weights, for peers that load a model directory themselves
(Unsloth's ``FastLanguageModel.from_pretrained``): written once per shape, seed and software stack under
the user's cache, never in the repository, and reused.

The weights are exactly what ``optkit.models.build_model`` makes for the same config, seed and device, so a
peer that loads them trains from the same start as optkit's other opt-sets of the point. Beside them: a
tokenizer built offline (a ``tokenizers`` WordLevel vocabulary of the model's vocab size with distinct
<pad>, </s>, <s>, <unk>, wrapped by ``PreTrainedTokenizerFast``), and the config's pad / eos / bos ids
pointing at those tokens (ids only: the weights are unchanged).

Where: ``$OPTKIT_CACHE_DIR/checkpoints/<model>-<hash>`` (default ``$XDG_CACHE_HOME/optkit``, else
``~/.cache/optkit``); the hash covers the shape, layer cut, dtype, seed, the device the weights were drawn
on and the torch / transformers versions (either may change what a seed draws). A directory is complete
once its ``optkit-checkpoint.json`` exists: it is written last, in a scratch directory renamed into place.

``python -m optkit.bench.checkpoint_cache --config POINT.json`` writes the checkpoint of a point's model
(the runner's point file) and prints its path: the unsloth point's process runs it in a child process
before it touches the GPU, so building the weights never counts in that point's memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch

MARKER = "optkit-checkpoint.json"
SPECIAL_TOKENS = ("<pad>", "</s>", "<s>", "<unk>")  # ids 0..3: pad, eos, bos, unk


def cache_root() -> Path:
    explicit = os.environ.get("OPTKIT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optkit"


def _identity(model_cfg, seed: int, device: torch.device) -> Dict[str, Any]:
    import transformers

    return {
        "model": model_cfg.name,
        "family": model_cfg.family,
        "hf_config": _plain(model_cfg.hf_config),
        "num_layers": model_cfg.num_layers,
        "dtype": model_cfg.dtype,
        "seed": seed,
        "device": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "format": 1,
    }


def _plain(node) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def checkpoint_dir(model_cfg, seed: int, device: torch.device) -> Path:
    identity = _identity(model_cfg, seed, torch.device(device))
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_root() / "checkpoints" / f"{model_cfg.name}-{digest}"


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def offline_tokenizer(vocab_size: int):
    """A fast tokenizer of exactly ``vocab_size`` tokens, built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(SPECIAL_TOKENS)} special tokens")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    pad, eos, bos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad, eos_token=eos, bos_token=bos, unk_token=unk)


def ensure_checkpoint(model_cfg, seed: int, device: Optional[torch.device] = None, log=None) -> Path:
    """The checkpoint directory of ``model_cfg``'s random weights (seed ``seed``, drawn on ``device``),
    written first when missing. A ``model.path`` checkpoint is the user's own: returned as it is."""
    if model_cfg.path:
        return Path(model_cfg.path).resolve()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    target = checkpoint_dir(model_cfg, seed, device)
    if is_complete(target):
        return target
    from optkit.models import build_model

    (log or _log)(f"optkit: writing {model_cfg.name}'s random-weights checkpoint to {target}")
    scratch = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    model = build_model(model_cfg, device, seed=seed)
    tokenizer = offline_tokenizer(model.config.vocab_size)
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, 2
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    (scratch / MARKER).write_text(json.dumps(_identity(model_cfg, seed, device), indent=2, default=str))
    del model
    try:
        scratch.rename(target)
    except OSError:  # another process finished the same checkpoint first: keep theirs
        shutil.rmtree(scratch, ignore_errors=True)
        if not is_complete(target):
            raise
    return target


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m optkit.bench.checkpoint_cache", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", required=True, help="the runner's point file: JSON {config: the resolved config}")
    args = parser.parse_args(argv)
    from optkit.config.compose import typed_config

    cfg = typed_config(json.loads(Path(args.config).read_text())["config"])
    print(ensure_checkpoint(cfg.model, cfg.train.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
