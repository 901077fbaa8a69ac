"""Energy of the timed steps: the counter read at the window's marks, the row fields, the report column."""

import sys

import pytest

from optkit.bench.point_fields import window_nvml_fields
from optkit.measure.energy import ENERGY_FIELDS, energy_delta_mj, window_energy_fields
from optkit.measure.nvml import NvmlSampler
from optkit.report.entries import train_entry
from optkit.report.tables import TRAIN_COLUMNS, render_markdown, visible_columns
from optkit.results.rows import ROW_FIELDS, empty_row
from optkit.results.runs import Point
from tests.measure.test_measure_nvml import FakeNvml


class CounterNvml(FakeNvml):
    """A counter that moves only when the test moves it (the base fake adds 10 mJ per read)."""

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.energy:
            raise RuntimeError("Not Supported")
        with self.lock:
            return self.energy_mj


def _sampler(monkeypatch, **fake_options):
    fake = CounterNvml(**fake_options)
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake, NvmlSampler(device_index=0, interval_ms=1.0).start()


def _window_fields(window, steps=10, tokens_per_step=4096):
    return {"nvml_timed_window_ms": window, "step_times_ms": [400.0] * steps, "tokens_per_step": tokens_per_step}


def test_window_energy_is_the_counter_between_the_window_marks(monkeypatch):
    fake, sampler = _sampler(monkeypatch)
    fake.energy_mj += 900_000  # model build and warm-up: before the window, not in it
    start = sampler.now_ms()
    fake.energy_mj += 2_800_000  # the timed steps: 2,800 J
    end = sampler.now_ms()
    fake.energy_mj += 500_000  # the profiled step after the window
    sampler.stop()
    assert sampler.energy_between(start, end) == 2_800_000
    assert sampler.report.energy_mj == 4_200_000  # the whole process, as before

    fields = window_nvml_fields(sampler, _window_fields([start, end]))
    assert fields["timed_energy_j"] == pytest.approx(2800.0)
    assert fields["energy_j_per_token"] == pytest.approx(2800.0 / (10 * 4096))
    assert fields["avg_power_w"] == pytest.approx(2800.0 / ((end - start) / 1e3))
    assert set(ENERGY_FIELDS) <= set(ROW_FIELDS)


def test_no_energy_counter_leaves_the_fields_none(monkeypatch):
    fake, sampler = _sampler(monkeypatch, energy=False)
    start = sampler.now_ms()
    end = sampler.now_ms()
    sampler.stop()
    assert sampler.energy_between(start, end) is None
    fields = window_nvml_fields(sampler, _window_fields([start, end]))
    assert all(fields[name] is None for name in ENERGY_FIELDS)


def test_a_counter_that_did_not_move_is_none_not_zero_joules(monkeypatch):
    _, sampler = _sampler(monkeypatch)
    start, end = sampler.now_ms(), sampler.now_ms()
    sampler.stop()
    assert sampler.energy_between(start, end) is None
    assert sampler.energy_between(start, end + 1.0) is None, "a time that is no mark has no reading"


def test_energy_arithmetic_and_missing_inputs():
    assert energy_delta_mj(10, 35) == 25
    assert energy_delta_mj(None, 35) is None and energy_delta_mj(35, 35) is None and energy_delta_mj(40, 35) is None
    fields = window_energy_fields(5_000, window_ms=2_000.0, tokens=1_000)
    assert fields == {"timed_energy_j": 5.0, "energy_j_per_token": 0.005, "avg_power_w": 2.5}
    assert window_energy_fields(None, 2_000.0, 1_000) == dict.fromkeys(ENERGY_FIELDS)
    no_tokens = window_energy_fields(5_000, 2_000.0, 0)
    assert no_tokens["energy_j_per_token"] is None and no_tokens["timed_energy_j"] == 5.0


def test_cpu_rows_have_no_energy():
    """A CPU point has no sampler: the window adds nothing and the row keeps empty_row's None."""
    assert window_nvml_fields(None, _window_fields([0.0, 1.0])) == {}
    assert all(empty_row()[name] is None for name in ENERGY_FIELDS)


def _row(opt, j_per_token=None, watts=None):
    row = dict(empty_row(), status="ok", opt=opt, model="m", step_times_ms=[100.0, 101.0], step_ms=100.0)
    row.update(tokens_per_step=4096, energy_j_per_token=j_per_token, avg_power_w=watts)
    return row


def test_report_shows_joules_per_token_beside_tokens_per_second():
    entries = [train_entry(Point("p", [_row("baseline", 0.0712, 655.0)]), None)]
    entries.append(train_entry(Point("q", [_row("full", 0.0631, 671.0)]), None))
    shown = visible_columns(TRAIN_COLUMNS, entries)
    headers = [c.header for c in shown]
    assert headers.index("J/token") == headers.index("tokens/s") + 1
    table = render_markdown(shown, entries, "setting")
    assert "0.0712" in table and "0.0631" in table and "671" in table


def test_rows_without_energy_keep_their_table_unchanged():
    """Committed runs from before the energy fields re-render with the same columns (and CSV keys)."""
    entry = train_entry(Point("p", [_row("baseline")]), None)
    assert "energy_j_per_token" not in entry and "avg_power_w" not in entry
    assert "J/token" not in [c.header for c in visible_columns(TRAIN_COLUMNS, [entry])]
