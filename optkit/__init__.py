"""optkit: measure and ship LLM fine-tuning kernels and training optimizations.

import optkit
model = optkit.patch(model, "full")   # before an HF Trainer / TRL SFTTrainer / a hand loop
optkit.unpatch(model)                 # back to the exact original modules
"""

from importlib import import_module

__version__ = "0.1.0"

_PATCHER_FUNCTIONS = ("patch", "unpatch", "patch_log")


def __getattr__(name):
    # Lazy, so `import optkit` stays cheap (the runner's parent process never loads the optimizations).
    if name in _PATCHER_FUNCTIONS:
        return getattr(import_module("optkit.opt.patcher"), name)
    raise AttributeError(f"module 'optkit' has no attribute {name!r}")
