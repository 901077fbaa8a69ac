"""optkit: measure and ship LLM fine-tuning kernels and training optimizations."""

__version__ = "0.1.0"
