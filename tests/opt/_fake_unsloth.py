"""A stand-in ``unsloth`` package for CPU tests (unsloth itself needs a GPU): it records how it was imported,
and its FastLanguageModel does what the real calls do in the small (load the directory offline with HF,
add peft LoRA) and prints the patch line Unsloth prints. Written to a directory that goes on PYTHONPATH, or
loaded as a module into sys.modules.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SOURCE = """
import json, os, sys

RECORD = {
    "imported_after": [m for m in ("transformers", "peft", "trl") if m in sys.modules],
    "cwd": os.getcwd(),
    "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "UNSLOTH_DISABLE_STATISTICS",
                                           "PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")},
}
if os.environ.get("FAKE_UNSLOTH_RECORD"):
    with open(os.environ["FAKE_UNSLOTH_RECORD"], "w") as fh:
        json.dump(RECORD, fh)
CALLS = []


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name, max_seq_length=2048, dtype=None, load_in_4bit=False, local_files_only=False,
                        offload_embedding="auto"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        CALLS.append(("from_pretrained", dict(model_name=model_name, max_seq_length=max_seq_length, dtype=dtype,
                                              load_in_4bit=load_in_4bit, local_files_only=local_files_only,
                                              offload_embedding=offload_embedding)))
        tokenizer = AutoTokenizer.from_pretrained(model_name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype, local_files_only=True)
        print("==((====))==  Unsloth (fake): loaded", model_name)
        return model, tokenizer

    @staticmethod
    def get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=(),
                       use_gradient_checkpointing=True, random_state=0):
        from peft import LoraConfig, get_peft_model

        CALLS.append(("get_peft_model", dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                                             target_modules=list(target_modules),
                                             use_gradient_checkpointing=use_gradient_checkpointing,
                                             random_state=random_state)))
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                            target_modules=list(target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        n = model.config.num_hidden_layers
        line = f"Unsloth 2099.1.1 patched {n} layers with {n} QKV layers, {n} O layers and {n} MLP layers.\\n"
        os.write(2, line.encode())
        return model
"""


def write_package(root: Path) -> Path:
    """``root/unsloth/__init__.py``; returns ``root`` (put it on PYTHONPATH)."""
    (root / "unsloth").mkdir(parents=True, exist_ok=True)
    (root / "unsloth" / "__init__.py").write_text(SOURCE)
    return root


def load_module(root: Path):
    """The fake package imported as the module ``unsloth`` (the caller puts it into sys.modules)."""
    spec = importlib.util.spec_from_file_location("unsloth", write_package(root) / "unsloth" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
