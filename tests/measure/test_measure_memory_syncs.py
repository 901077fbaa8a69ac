"""Allocator / host memory on CPU, and the sync counter's bookkeeping with a stand-in torch.cuda."""

import warnings

import pytest
import torch

from optkit.measure import syncs
from optkit.measure.memory import (
    ALLOCATOR_FIELDS,
    allocator_peaks,
    current_rss_bytes,
    peak_rss_bytes,
    reset_allocator_peaks,
)


def test_allocator_peaks_are_none_on_cpu():
    reset_allocator_peaks("cpu")  # no-op, no error
    peaks = allocator_peaks(torch.device("cpu"))
    assert set(peaks) == set(ALLOCATOR_FIELDS) and all(v is None for v in peaks.values())


def test_host_rss_sees_a_64mib_buffer():
    import gc
    import mmap

    # A garbage collection between the two readings (objects left by earlier tests in this worker) could
    # return more memory than the buffer adds: collect first and keep the collector off while measuring.
    gc.collect()
    gc.disable()
    try:
        before = current_rss_bytes()
        buf = mmap.mmap(-1, 64 * 2**20)  # a fresh anonymous mapping: resident only once touched
        for offset in range(0, len(buf), mmap.PAGESIZE):
            buf[offset] = 1
        after = current_rss_bytes()
    finally:
        gc.enable()
    assert after - before >= 60 * 2**20
    assert peak_rss_bytes() >= after - 2**20  # high-water mark, within one page-ish of rounding
    buf.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_count_device_syncs_without_cuda_is_none():
    ran = []
    assert syncs.count_device_syncs(lambda: ran.append(1)) is None
    assert ran == []


def test_count_device_syncs_counts_every_sync_warning_and_restores_the_mode(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step():
        for _ in range(3):  # same call site three times: each one counts
            warnings.warn(syncs.SYNC_WARNING_TEXT, UserWarning)
        warnings.warn("unrelated deprecation", DeprecationWarning)

    with pytest.warns(DeprecationWarning, match="unrelated"):  # other warnings reach the caller
        assert syncs.count_device_syncs(step) == 3
    assert modes == ["warn", 0]

    def failing():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        syncs.count_device_syncs(failing)
    assert modes[-1] == 0
