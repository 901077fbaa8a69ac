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
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
        _fail_on_memory_outside_the_allocator(request.node.nodeid)


_OUTSIDE_ALLOCATOR = {}  # device memory in use but not PyTorch's cache, first seen after a gpu test
LEAK_BYTES = 1024**3


def _fail_on_memory_outside_the_allocator(test: str) -> None:
    """A gpu test that leaves device memory taken outside PyTorch's allocator (card emulation's ballast goes
    through the driver) starves every later test into OOMs: fail the test that did it, by name, instead."""
    import torch

    free, total = torch.cuda.mem_get_info()
    outside = total - free - torch.cuda.memory_reserved()
    first = _OUTSIDE_ALLOCATOR.setdefault("first", outside)  # the CUDA context, cuBLAS workspaces, NCCL, ...
    if outside - first > LEAK_BYTES:
        _OUTSIDE_ALLOCATOR["first"] = outside  # said once: later tests are judged from here
        pytest.fail(
            f"{test} left {(outside - first) / 1024**3:.1f} GiB of device memory outside PyTorch's allocator",
            pytrace=False,
        )
