"""PhaseTimer and WallClock on CPU, with sleeps as known lower bounds."""

import time

import pytest
import torch

from optkit.measure.timing import PhaseTimer, WallClock

SLEEP_MS = {"forward": 4.0, "backward": 8.0, "optimizer": 2.0}


def _timed_steps(timer, n_steps):
    for _ in range(n_steps):
        timer.begin_step()
        for phase, ms in SLEEP_MS.items():
            time.sleep(ms / 1e3)
            timer.mark(phase)
        timer.end_step()


def test_cpu_phases_bound_below_by_sleeps_and_sum_to_step():
    timer = PhaseTimer(torch.device("cpu"))
    _timed_steps(timer, 4)
    rows = timer.results()
    assert len(rows) == 4
    for row in rows:
        assert set(row) == {"forward_ms", "backward_ms", "optimizer_ms", "other_ms", "step_ms"}
        for phase, ms in SLEEP_MS.items():
            assert row[f"{phase}_ms"] >= ms
        phases = sum(v for k, v in row.items() if k != "step_ms")
        assert phases == pytest.approx(row["step_ms"], abs=1e-6)
        # order of magnitude only: a loaded 2-core machine may oversleep, never by 20x
        assert row["step_ms"] < 20 * sum(SLEEP_MS.values())


def test_repeated_phase_adds_up_and_results_accumulate_across_calls():
    timer = PhaseTimer("cpu")
    timer.begin_step()
    for _ in range(2):  # gradient accumulation: two forward/backward pairs
        time.sleep(0.002)
        timer.mark("forward")
        timer.mark("backward")
    timer.end_step()
    first = timer.results()
    assert first[0]["forward_ms"] >= 4.0
    _timed_steps(timer, 1)
    assert len(timer.results()) == 2 and timer.n_steps == 2
    timer.reset()
    assert timer.results() == [] and timer.n_steps == 0


def test_misuse_is_reported():
    timer = PhaseTimer("cpu")
    with pytest.raises(RuntimeError, match="begin_step"):
        timer.mark("forward")
    with pytest.raises(RuntimeError):
        timer.end_step()
    timer.begin_step()
    with pytest.raises(RuntimeError, match="twice"):
        timer.begin_step()
    for reserved in ("step", "other", ""):
        with pytest.raises(ValueError):
            timer.mark(reserved)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_timer_without_cuda_says_so():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        PhaseTimer("cuda")


def test_wall_clock():
    with WallClock("cpu") as clock:
        time.sleep(0.01)
    assert 10.0 <= clock.elapsed_ms < 1000.0
    with pytest.raises(RuntimeError):
        WallClock().stop()
