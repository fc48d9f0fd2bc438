"""The host's pressure policy: a pure state machine over resource snapshots.

Nothing here reads a clock, the host or the pool: callers pass what they measured, so every
rule is tested with synthetic snapshots (``tests/unit/test_pressure.py``). What pressure
does to a request's order is the planner's (:mod:`sidecar.routing.planner`); what it does to
the local workers is :class:`~sidecar.host.watch.HostWatch`'s.

* :func:`next_pressure` is the host's pressure state machine, fed one snapshot at a time::

      cpu off --(app CPU high for pressure_after_s)----------> cpu on
      cpu on  --(others' CPU <= low for calm_after_s)------> cpu off
      memory off --(available < floor)--------------------------------> memory on
      memory on  --(available >= floor + margin for calm_after_s)------> memory off

  Two thresholds and two durations are the hysteresis: a host hovering around one number
  does not flap between local and remote. "Others" is the host's CPU minus the sidecar's
  own and its workers', so local inference never counts as pressure against itself. The
  app's CPU is "high" when others use at least ``cpu_high_percent``, or when the host is
  saturated (at least ``cpu_high_percent`` busy in all) and others hold at least
  ``cpu_contended_percent``: competing with local inference, an app that wants every core
  gets only its share of them, so what it uses understates what it wants.
* :class:`LocalLoad` is what the model pool reports of one local model (its queue and
  measured speed), the planner's input for the local deadline rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from sidecar.host.sampler import ResourceSnapshot


class PressureSettings(msgspec.Struct, frozen=True, kw_only=True):
    cpu_high_percent: float = 85.0
    cpu_contended_percent: float = 40.0
    cpu_low_percent: float = 30.0
    pressure_after_s: float = 5.0
    calm_after_s: float = 15.0
    memory_floor_bytes: int = 0
    """0: no memory rule."""
    memory_margin_bytes: int = 256 << 20


class Pressure(msgspec.Struct, frozen=True, kw_only=True):
    """The host's pressure after the latest snapshot."""

    cpu: bool = False
    memory: bool = False
    cpu_since: float | None = None
    """When the CPU's current run toward a change began (high while off, low while on)."""
    memory_since: float | None = None
    """When memory's current calm run began (while on)."""
    changed_at: float | None = None
    """When ``cpu`` or ``memory`` last changed."""

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(k for k, on in (("cpu", self.cpu), ("memory", self.memory)) if on)


def next_pressure(prev: Pressure, snap: ResourceSnapshot, s: PressureSettings) -> Pressure:
    """The pressure state after ``snap`` (see the module's state machine)."""
    now = snap.taken_at
    cpu, cpu_since = prev.cpu, prev.cpu_since
    others = snap.others_cpu_percent
    if cpu:
        crossing = others <= s.cpu_low_percent
    else:
        crossing = others >= s.cpu_high_percent or (
            snap.cpu_percent >= s.cpu_high_percent and others >= s.cpu_contended_percent)
    if not crossing:
        cpu_since = None
    else:
        cpu_since = now if cpu_since is None else cpu_since
        if now - cpu_since >= (s.calm_after_s if cpu else s.pressure_after_s):
            cpu, cpu_since = not cpu, None

    memory, memory_since = prev.memory, prev.memory_since
    available = snap.memory_available_bytes
    if s.memory_floor_bytes <= 0:
        memory, memory_since = False, None
    elif not memory:
        memory, memory_since = available < s.memory_floor_bytes, None
    elif available >= s.memory_floor_bytes + s.memory_margin_bytes:
        memory_since = now if memory_since is None else memory_since
        if now - memory_since >= s.calm_after_s:
            memory, memory_since = False, None
    else:
        memory_since = None

    changed = prev.changed_at if (cpu, memory) == (prev.cpu, prev.memory) else now
    return Pressure(cpu=cpu, memory=memory, cpu_since=cpu_since, memory_since=memory_since,
                    changed_at=changed)


class LocalLoad(msgspec.Struct, frozen=True, kw_only=True):
    """A local model's queue and measured speed (from the model pool's status)."""

    loaded: bool
    in_flight: int
    queued: int
    n_parallel: int
    ttft_s: float | None = None
    decode_tps: float | None = None
    """Tokens per second of one sequence while decoding."""
    avg_completion_tokens: float | None = None
    avg_duration_s: float | None = None
    load_s: float | None = None
