"""Energy of the timed steps: NVML's cumulative energy counter read at the window's two edges.

Why the counter and not power samples: ``nvmlDeviceGetPowerUsage`` is a ~1 s moving average on
recent drivers, so sampled power smears the build and warm-up into the window; the counter
(``nvmlDeviceGetTotalEnergyConsumption``, mJ since the driver loaded, Volta and newer) is exact
at each read, and the difference of two reads is the energy in between. Each edge is read on the
host right where the window is marked (before its first step, after its final synchronize), so
the figure is the device's energy over exactly the timed steps, idle gaps between them included.

Limits: the counter is device-wide (another process's work on the same GPU counts too; rows
record ``other_gpu_processes``), and it advances in steps of the driver's update period, so a
window far shorter than ~1 s reads coarsely; a window whose reads did not move is reported as
None rather than as zero joules. No counter (pre-Volta, a driver that refuses) -> None.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

ENERGY_FIELDS = ("timed_energy_j", "energy_j_per_token", "avg_power_w")


def read_energy_mj(pynvml, handle) -> Optional[int]:
    """The cumulative energy counter in mJ, or None when this GPU / driver has none."""
    try:
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    except Exception:  # NVMLError_NotSupported, a binding without the call
        return None


def energy_delta_mj(start_mj: Optional[int], end_mj: Optional[int]) -> Optional[int]:
    """end - start, or None when either read failed or the counter did not move (too short a window)."""
    if start_mj is None or end_mj is None or end_mj <= start_mj:
        return None
    return end_mj - start_mj


def window_energy_fields(
    energy_mj: Optional[int], window_ms: Optional[float], tokens: Optional[float]
) -> Dict[str, Any]:
    """``timed_energy_j``, ``energy_j_per_token`` and ``avg_power_w`` of one timed window; None where
    a figure cannot be had (no counter, no tokens, an empty window)."""
    fields: Dict[str, Any] = dict.fromkeys(ENERGY_FIELDS)
    if energy_mj is None:
        return fields
    joules = energy_mj / 1e3
    fields["timed_energy_j"] = joules
    if tokens:
        fields["energy_j_per_token"] = joules / tokens
    if window_ms and window_ms > 0:
        fields["avg_power_w"] = joules / (window_ms / 1e3)
    return fields
