"""The host: what it has left, how hard it is pressed, and what that does to local workers.

- :mod:`~sidecar.host.sampler`: :class:`Sampler` measures the host (psutil, NVML when
  present) into immutable :class:`ResourceSnapshot` values; :class:`Monitor` runs it every
  interval in a thread.
- :mod:`~sidecar.host.pressure`: the pressure policy, pure: :func:`next_pressure` steps the
  :class:`Pressure` state machine (with the hysteresis of :class:`PressureSettings`);
  :class:`LocalLoad` is a local model's queue and speed, as the planner weighs it.
- :mod:`~sidecar.host.watch`: :class:`HostWatch`, the effects: owns the monitor and the
  pressure state, yields the CPU of local workers and unloads idle models under pressure.

How pressure orders a request's targets is the planner's (:mod:`sidecar.routing.planner`).
"""

from sidecar.host.pressure import LocalLoad, Pressure, PressureSettings, next_pressure
from sidecar.host.sampler import Monitor, ResourceSnapshot, Sampler
from sidecar.host.watch import HostWatch, memory_floor_bytes, pressure_settings

__all__ = [
    "HostWatch",
    "LocalLoad",
    "Monitor",
    "Pressure",
    "PressureSettings",
    "ResourceSnapshot",
    "Sampler",
    "memory_floor_bytes",
    "next_pressure",
    "pressure_settings",
]
