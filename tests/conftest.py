"""Test setup shared by every test file.

Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before triton
is first imported, which is why it happens here, at collection time.
"""
import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Tiny CPU models: a second intra-op thread only spins (about 50x slower on a shared 2-core box).
    import torch

    torch.set_num_threads(1)

HAS_CUDA = _cuda_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
