"""The kernels suite's CUDA-graph column: launch-bound classification on synthetic numbers, the row plumbing
with a scripted graph timer, the CPU answer, and (GPU only) capture and replay of real calls."""

from __future__ import annotations

import pytest
import torch

from optkit.bench.kernels import ops as kernel_ops
from optkit.bench.kernels import rows as kernel_rows
from optkit.bench.kernels import run as kernel_run
from optkit.bench.kernels import table as kernel_table
from optkit.measure import device_timing
from tests.bench.test_kernels_suite import CPU, _case, _context


@pytest.mark.parametrize(
    "full_ms, graph_ms, expected",
    [
        (0.626, 0.20, True),  # host launches triple the time of a small op
        (0.25, 0.20, True),  # exactly LAUNCH_BOUND_RATIO x: launch-bound
        (0.249, 0.20, False),
        (1.02, 1.00, False),  # the host keeps ahead: the two agree within noise
        (0.90, 1.00, False),  # a replay slower than events (noise, L2) is not launch-bound
        (None, 1.00, None),
        (1.00, None, None),
    ],
)
def test_launch_bound_when_event_time_is_well_above_the_graph_replay(full_ms, graph_ms, expected):
    assert kernel_rows.is_launch_bound(full_ms, graph_ms) is expected


def test_fill_graph_takes_the_median_replay_and_the_overhead():
    row = {"full_ms": 0.8}
    kernel_rows.fill_graph(row, [0.31, 0.29, 0.30, 0.90], None)
    assert row["graph_ms"] == pytest.approx(0.305) and row["graph_times_ms"] == [0.31, 0.29, 0.30, 0.90]
    assert row["launch_overhead_ms"] == pytest.approx(0.495) and row["launch_bound"] is True
    assert row["graph_error"] is None

    kernel_rows.fill_graph(row, None, "graph capture: operation not permitted when stream is capturing")
    assert row["graph_ms"] is None and row["launch_bound"] is None and row["launch_overhead_ms"] is None
    assert row["graph_error"].startswith("graph capture")


def test_measure_graph_needs_cuda():
    with pytest.raises(device_timing.GraphUnavailable, match="need CUDA"):
        device_timing.measure_graph(lambda x: x * 2, {"x": torch.ones(3)}, CPU, 3, lambda: None)


def _swiglu_row(monkeypatch, graph):
    monkeypatch.setattr(kernel_run, "measure_graph", graph)
    case = _case("swiglu")
    master = kernel_ops.SPECS["swiglu"].make_inputs(case, torch.float32, CPU)
    return kernel_run.run_impl(case, "eager", "float32", master, _context())


def test_a_row_gets_graph_times_of_as_many_replays_as_event_repeats(monkeypatch):
    seen = {}

    def scripted(call, master, device, repeats, flush, forward_only, timer_factory):
        seen.update(repeats=repeats, forward_only=forward_only)
        return [0.5] * repeats

    row = _swiglu_row(monkeypatch, scripted)
    assert row["status"] == "ok" and seen == {"repeats": row["repeats"], "forward_only": False}
    assert row["graph_ms"] == 0.5 and row["full_ms"] == 2.0  # FakeTimer's median
    assert row["launch_bound"] is True and row["launch_overhead_ms"] == pytest.approx(1.5)
    assert "LAUNCH-BOUND" in kernel_table.format_table([row]).splitlines()[2]  # the row's line, not the notes


def test_a_call_that_cannot_be_captured_keeps_its_other_times(monkeypatch):
    def refuses(*args):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    row = _swiglu_row(monkeypatch, refuses)
    assert row["status"] == "ok" and row["full_ms"] == 2.0
    assert row["graph_ms"] is None and row["launch_bound"] is None
    assert row["graph_error"].startswith("graph capture: RuntimeError") and "capturing" in row["graph_error"]
    assert "LAUNCH-BOUND" not in kernel_table.format_table([row]).splitlines()[2]  # the row's line


def test_cpu_smoke_rows_say_why_they_have_no_graph_time(tmp_path):
    from tests.bench.test_kernels_suite import FAKE_ENV

    rows = kernel_run.run_suite(
        tmp_path, cpu_smoke=True, ops=("swiglu",), impls=("eager",), env=FAKE_ENV, log=lambda m: None
    )
    assert rows and all(r["status"] == "ok" for r in rows)
    assert all(
        r["graph_ms"] is None and r["graph_error"] == "CUDA graphs need CUDA; this run is on the CPU" for r in rows
    )


# --------------------------------------------------------------------------- on the GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_graph_replays_a_launch_heavy_call_faster_than_its_host_launches():
    """200 tiny kernels: launched one by one from Python the host sets the time; one replay does not."""
    device = torch.device("cuda")
    master = {"x": torch.randn(64, device=device, requires_grad=True)}

    def many_small_kernels(x):
        for _ in range(100):
            x = x * 1.0001
        return x

    flush = device_timing.L2Flush(device)
    graph = device_timing.measure_graph(many_small_kernels, master, device, 20, flush)
    events = device_timing.measure(many_small_kernels, master, device, device_timing.Settings(), flush)
    assert len(graph) == 20 and all(t > 0 for t in graph)
    full = sorted(events.full_ms)[len(events.full_ms) // 2]
    assert kernel_rows.is_launch_bound(full, sorted(graph)[10]) is True, (full, sorted(graph)[10])


@pytest.mark.gpu
@needs_cuda
def test_a_host_sync_fails_capture_and_the_next_capture_still_works():
    device = torch.device("cuda")
    master = {"x": torch.randn(1024, device=device, requires_grad=True)}
    flush = device_timing.L2Flush(device)

    def syncs(x):
        return x * float(x.sum().item())  # .item() waits for the device: not capturable

    with pytest.raises(device_timing.GraphUnavailable, match="syncs with the host"):
        device_timing.measure_graph(syncs, master, device, 3, flush)
    assert len(device_timing.measure_graph(lambda x: x * 2, master, device, 3, flush)) == 3
    torch.randn(8, device=device)  # a failed capture must not leave CUDA's RNG in capture state
