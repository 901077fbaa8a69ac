"""What the two examples share, none of it optkit-specific: a model, a tokenizer and text that need no
download, the LoRA config, and a meter that prints each run as one JSON line.

Copy this file with the example. In your own script, replace ``load_model`` with your
``AutoModelForCausalLM.from_pretrained(...)`` / ``AutoTokenizer.from_pretrained(...)`` and
``text_dataset`` with your data.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Optional

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # optkit's Triton kernels run on CPU tensors only under Triton's interpreter (slow, but real);
    # it must be switched on before triton is first imported, and transformers imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(min(4, torch.get_num_threads()))

from transformers import PreTrainedTokenizerFast, TrainerCallback  # noqa: E402  (after TRITON_INTERPRET)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_common_args(parser) -> None:
    parser.add_argument(
        "--model",
        default="llama3_8b" if ON_GPU else "tiny_llama",
        help="an optkit shape name (conf/model/*.yaml: llama3_8b, qwen3_8b, tiny_llama, ...; random weights) "
        "or a local checkpoint directory (its weights and tokenizer)",
    )
    parser.add_argument("--opt", default="full", help="optkit preset (conf/opt/*.yaml) or 'off' for plain HF + peft")
    parser.add_argument("--steps", type=int, default=30 if ON_GPU else 6)
    parser.add_argument("--warmup-steps", type=int, default=10 if ON_GPU else 2, help="steps left out of tokens/s")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=2048 if ON_GPU else 32, help="tokens per row")
    parser.add_argument("--seed", type=int, default=0)


def load_model(name_or_path: str, seed: int = 0):
    """(model, tokenizer): a local checkpoint as it is, or an optkit shape with random weights (bf16 on a GPU,
    fp32 on CPU) and a byte-level tokenizer (its ids fit every shape's vocabulary)."""
    if os.path.isdir(name_or_path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.bfloat16 if ON_GPU else torch.float32
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, device_map={"": _device()})
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    from optkit.config.compose import compose
    from optkit.models import build_model

    dtype = "bfloat16" if ON_GPU else "float32"
    model = build_model(compose([f"model={name_or_path}", f"model.dtype={dtype}"]).model, _device(), seed=seed)
    return model, byte_tokenizer()


def _device() -> str:
    return "cuda" if ON_GPU else "cpu"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (256 ids) plus <pad>, <s>, </s>: a real tokenizer object, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), pre_tokenizers.Split("", "isolated")]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def text_dataset(n_rows: int, n_chars: int, seed: int = 0):
    """``n_rows`` texts of ``n_chars`` characters of small sums ("12+7=19; 3+30=33; ..."): text a model learns
    from in a few steps, so the loss visibly falls."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        text = ""
        while len(text) < n_chars:
            a, b = rng.randrange(50), rng.randrange(50)
            text += f"{a}+{b}={a + b}; "
        rows.append(text[:n_chars])
    return Dataset.from_dict({"text": rows})


def lora_config():
    from peft import LoraConfig

    # lora_dropout=0: optkit's fused LoRA path is dropout-free (with dropout those layers stay peft's, and
    # optkit.patch says so).
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")


class RunMeter(TrainerCallback):
    """Tokens/s over the steps after warm-up (real tokens: Trainer's num_input_tokens_seen, "non_padding"),
    the peak GPU memory and the loss of every step; ``report`` prints them as one JSON line."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps
        self.start: Optional[tuple] = None
        self.end: Optional[tuple] = None
        self.losses = []

    def _mark(self, state) -> tuple:
        if ON_GPU:
            torch.cuda.synchronize()
        return time.perf_counter(), state.num_input_tokens_seen, state.global_step

    def on_train_begin(self, args, state, control, **kwargs):
        if ON_GPU:
            torch.cuda.reset_peak_memory_stats()
        if self.warmup_steps == 0:
            self.start = self._mark(state)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup_steps:
            self.start = self._mark(state)
        self.end = self._mark(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(round(float(logs["loss"]), 5))

    def report(self, example: str, args, model) -> dict:
        import optkit

        timed = self.start is not None and self.end is not None and self.end[2] > self.start[2]
        row = {
            "example": example,
            "model": args.model,
            "opt": args.opt,
            "device": torch.cuda.get_device_name() if ON_GPU else "cpu",
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "steps": len(self.losses),
            "timed_steps": self.end[2] - self.start[2] if timed else 0,
            "tokens_per_s": round((self.end[1] - self.start[1]) / (self.end[0] - self.start[0]), 1) if timed else None,
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if ON_GPU else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if ON_GPU else None,
            "losses": self.losses,
            "optkit": optkit.patch_log(model),
        }
        line = json.dumps(row)
        print(line, flush=True)
        if os.environ.get("OUT"):
            with open(Path(os.environ["OUT"]) / f"{example}.jsonl", "a") as out:
                out.write(line + "\n")
        return row
