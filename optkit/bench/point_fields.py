"""The NVML and environment fields of a point's row (optkit.bench.point measures; this fills the row).

NVML is sampled by a background thread for the point's whole life; a window's own figures (its peak,
one step at full rate) are cut from the raw samples by the time marks the point records on the
sampler's clock; the window's energy is the counter read at those two marks (measure/energy.py).
"""

from __future__ import annotations

from typing import Any, Dict

import torch


def start_nvml(cfg, device: torch.device):
    if device.type != "cuda":
        return None
    from optkit.measure.nvml import NvmlSampler

    torch.empty(1, device=device)  # create the CUDA context first: the sampler's baseline includes it
    index = device.index if device.index is not None else torch.cuda.current_device()
    sampler = NvmlSampler(device_index=index, interval_ms=cfg.bench.nvml_interval_ms)
    sampler.start()
    return sampler


def nvml_fields(report) -> Dict[str, Any]:
    r = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    series = list(zip(r.get("series_t_ms") or [], r.get("series_used_bytes") or []))
    return {
        "nvml_available": r.get("available"),
        "peak_nvml_device_bytes": r.get("peak_device_used_bytes"),
        "peak_nvml_process_bytes": r.get("peak_process_used_bytes"),
        "nvml_baseline_bytes": r.get("baseline_device_used_bytes"),
        "nvml_process_bytes_source": r.get("process_bytes_source"),
        "throttle_reasons": r.get("throttle_reasons_seen"),
        "throttled": r.get("throttled"),
        "sm_clock_mhz": r.get("sm_clock_mhz_stop"),
        "sm_clock_mhz_min": r.get("sm_clock_mhz_min"),
        "energy_mj": r.get("energy_mj"),
        "other_gpu_processes": r.get("other_processes_at_start"),
        "nvml_series": [[round(t, 1), b] for t, b in series] or None,
    }


def window_nvml_fields(sampler, fields: Dict[str, Any]) -> Dict[str, Any]:
    """A window's own NVML figures, from the raw samples: its peak, and one step's samples at full rate
    (the profiled step when there is one, else the window's last step: its end is the synchronize
    after the window, so ``[end - its step_ms, end]`` is where it ran)."""
    window = fields.get("nvml_timed_window_ms")
    if sampler is None or not window:
        return {}
    out: Dict[str, Any] = {"peak_nvml_timed_device_bytes": sampler.peak_device_used_between(*window)}
    out.update(_window_energy(sampler, window, fields))
    step, of = fields.get("nvml_profiled_step_ms"), "profiled_step"
    if not step:
        step, of = [window[1] - fields["step_times_ms"][-1], window[1]], "last_timed_step"
    # one sample either side, so a step shorter than the sampling interval still has a line to draw
    margin = sampler.interval_ms
    samples = sampler.samples_between(step[0] - margin, step[1] + margin)
    if samples:
        out["nvml_step_series"] = [[round(t - step[0], 1), used] for t, used in samples]
        out["nvml_step_series_of"] = of
    return out


def _window_energy(sampler, window, fields: Dict[str, Any]) -> Dict[str, Any]:
    """Joules, J/token and mean watts of the timed steps, from the energy counter read at the window's marks."""
    from optkit.measure.energy import window_energy_fields

    steps = len(fields.get("step_times_ms") or [])
    tokens = (fields.get("tokens_per_step") or 0) * steps
    return window_energy_fields(sampler.energy_between(*window), window[1] - window[0], tokens)


def env_fields() -> Dict[str, Any]:
    from optkit.measure.env import capture_env
    from optkit.results.rows import env_stamp

    return env_stamp(capture_env())
