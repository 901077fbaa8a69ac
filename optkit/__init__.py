"""optkit: measure and ship LLM fine-tuning kernels and training optimizations.

    import optkit
    model = optkit.patch(model, "full")   # before an HF Trainer / TRL SFTTrainer / a hand loop
    optkit.unpatch(model)                 # back to the exact original modules
"""
from importlib import import_module

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import optkit` stays cheap (the runner's parent process never loads triton).
    # optkit.patch is the (callable) module optkit/patch.py: optkit.patch(model, "full") works.
    if name == "patch":
        return import_module("optkit.patch")
    if name in ("unpatch", "patch_log"):
        return getattr(import_module("optkit.patch"), name)
    raise AttributeError(f"module 'optkit' has no attribute {name!r}")
