"""Test setup shared by every test file.

Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before triton
is first imported, which is why it happens here, at collection time.
"""

import os

import pytest
from hypothesis import settings

# Property tests draw the same cases on every run, in CI and locally alike (a red CI run must not depend
# on the draw); HYPOTHESIS_PROFILE=explore draws fresh cases when hunting for new failures.
settings.register_profile("derandomized", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "derandomized"))


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


@pytest.fixture(autouse=True)
def _release_gpu_memory_after_gpu_tests(request):
    """HF and peft models hold reference cycles, so a GPU test's 8B-shape model outlives the test until
    Python's cyclic GC happens to run; the next test then runs out of device memory depending on the
    order the files were given in (seen: patch equivalence after fused LoRA). Collect and return the
    cached blocks after every gpu-marked test."""
    yield
    if HAS_CUDA and request.node.get_closest_marker("gpu") is not None:
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
