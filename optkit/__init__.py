"""optkit: measure and ship LLM fine-tuning kernels and training optimizations.

import optkit
model = optkit.patch(model, "full")   # after get_peft_model, before an HF Trainer / TRL SFTTrainer / a hand loop
print("\n".join(optkit.patch_log(model)))  # what changed, what was left alone and why
optkit.unpatch(model)                 # back to the exact original modules

examples/hf_trainer.py and examples/trl_sft.py are scripts to copy.
"""

from importlib import import_module

__version__ = "0.1.0"

_PATCHER_FUNCTIONS = ("patch", "unpatch", "patch_log")


def __getattr__(name):
    # Lazy, so `import optkit` stays cheap (the runner's parent process never loads the optimizations).
    if name in _PATCHER_FUNCTIONS:
        return getattr(import_module("optkit.opt.patcher"), name)
    raise AttributeError(f"module 'optkit' has no attribute {name!r}")
