"""The offload policy: pure functions of a resource snapshot, a route and a request.

Nothing here reads a clock, the host or the pool: callers pass what they measured, so every
rule is tested with synthetic snapshots (``tests/unit/test_pressure.py``).

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
* :func:`local_eta_s` predicts how long a local model takes to answer a request from its
  queue and its measured speed; :func:`arrange` orders a route's targets for one request:
  the route's preference first, then local targets behind remote ones while the host is
  under pressure or when the request would wait in the local queue and then miss its
  deadline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgspec

from sidecar.config import LOCAL_PROVIDER

if TYPE_CHECKING:
    from sidecar.host.sampler import ResourceSnapshot
    from sidecar.routing.routes import Target


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


def waits_for_slot(load: LocalLoad) -> bool:
    """Whether a new request would queue behind others before a slot is free."""
    return load.in_flight + load.queued >= max(load.n_parallel, 1)


def local_eta_s(load: LocalLoad, max_tokens: int | None) -> float | None:
    """Seconds until a new request of up to ``max_tokens`` (None: as long as the model's
    answers usually are) would be answered; None when the model has not been measured yet
    (it is then assumed to be in time)."""
    if load.decode_tps is None or load.decode_tps <= 0 or load.ttft_s is None:
        return None
    tokens = max_tokens if max_tokens is not None else (load.avg_completion_tokens or 0.0)
    eta = load.ttft_s + tokens / load.decode_tps
    n = max(load.n_parallel, 1)
    if waits_for_slot(load):
        # Everything ahead of it must finish in waves of n_parallel before its turn.
        waves = math.ceil((load.in_flight + load.queued + 1 - n) / n)
        eta += waves * (load.avg_duration_s or eta)
    if not load.loaded:
        eta += load.load_s or 0.0
    return eta


def late_eta_s(load: LocalLoad, max_tokens: int | None, left_s: float, *,
               only_if_queued: bool = False) -> float | None:
    """:func:`local_eta_s` when it exceeds ``left_s`` (the request would miss its deadline),
    else None (in time, or not measured). ``only_if_queued``: only when the request would
    also wait for a free slot (a local-first route's own choice is not given up for a long
    ``max_tokens`` alone)."""
    if only_if_queued and not waits_for_slot(load):
        return None
    eta = local_eta_s(load, max_tokens)
    return eta if eta is not None and eta > left_s else None


class Arrangement(msgspec.Struct, frozen=True):
    order: tuple[Target, ...]
    reasons: tuple[str, ...]
    """Why local targets were moved behind remote ones (``offload:*``), in rule order."""


def is_local(target: Target) -> bool:
    return target.provider == LOCAL_PROVIDER


def arrange(ordered: Sequence[Target], prefer: str | None, pressure: Pressure,
            too_slow: Callable[[Target], bool]) -> Arrangement:
    """Order ``ordered`` (the strategy's order) for one request.

    ``prefer`` moves local ("local") or remote ("remote") targets to the front, keeping the
    strategy's order within each group. Then, if some local target would still be tried
    before a remote one: under CPU or memory pressure every local target moves behind the
    remote ones (``offload:cpu`` / ``offload:memory``); otherwise local targets for which
    ``too_slow`` holds (the request would wait for a slot and then miss its deadline) do
    (``offload:queue``).
    Offloaded targets stay in the plan as a last resort."""
    order = list(ordered)
    if prefer is not None:
        first_local = prefer == "local"
        order.sort(key=lambda t: is_local(t) != first_local)
    remote_at = [i for i, t in enumerate(order) if not is_local(t)]
    if not remote_at or not any(is_local(t) for t in order[:remote_at[-1]]):
        return Arrangement(tuple(order), ())
    reasons = [f"offload:{r}" for r in pressure.reasons]
    if reasons:
        moved = [t for t in order if is_local(t)]
    else:
        moved = [t for t in order[:remote_at[-1]] if is_local(t) and too_slow(t)]
        reasons = ["offload:queue"] if moved else []
    kept = [t for t in order if t not in moved]
    return Arrangement(tuple(kept + moved), tuple(reasons))
