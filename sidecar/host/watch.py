"""The host as the gateway sees it: the latest resource snapshot, the pressure state derived
from it, and the effects pressure has on this host: local workers yielding the CPU, idle
local models giving their memory back.

Contract: :meth:`HostWatch.on_sample` is the monitor's callback (on the event loop): it steps
the pure :func:`~sidecar.host.pressure.next_pressure` state machine and, when CPU pressure starts,
renices local workers to ``nice``, cuts their decode threads to ``threads`` and pins them to
``cpus`` (each when set); when it ends they get their own back. When memory pressure starts,
idle local models are unloaded. Every change of state is reported on stderr. The request
path only reads :attr:`HostWatch.pressure` and :attr:`HostWatch.snapshot`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import psutil

from sidecar.config import ResourcesConfig
from sidecar.host.pressure import Pressure, PressureSettings, next_pressure
from sidecar.host.sampler import Monitor, ResourceSnapshot, Sampler
from sidecar.logs import fields

log = logging.getLogger("sidecar.host")

#: Applies a priority to every local worker: niceness, CPU set and decode threads, each None
#: to restore the worker's own.
SetPriority = Callable[[int | None, Sequence[int] | None, int | None], None]


def memory_floor_bytes(config: ResourcesConfig, total_bytes: int) -> int:
    """The configured floor, or by default 10% of RAM, at most 2 GiB."""
    if config.memory_floor_mb is not None:
        return config.memory_floor_mb << 20
    return min(total_bytes // 10, 2048 << 20)


def pressure_settings(config: ResourcesConfig, total_bytes: int) -> PressureSettings:
    return PressureSettings(
        cpu_high_percent=config.cpu_high_percent,
        cpu_low_percent=config.cpu_low_percent,
        cpu_contended_percent=config.cpu_contended_percent,
        pressure_after_s=config.pressure_after_s,
        calm_after_s=config.calm_after_s,
        memory_floor_bytes=memory_floor_bytes(config, total_bytes),
        memory_margin_bytes=config.memory_margin_mb << 20,
    )


class HostWatch:
    """Owns the monitor and the pressure state. Use from one event loop."""

    def __init__(self, config: ResourcesConfig, *,
                 workers: Callable[[], Sequence[tuple[str, int]]] = tuple,
                 set_priority: SetPriority | None = None,
                 unload_idle: Callable[[], Awaitable[list[str]]] | None = None) -> None:
        """``workers``: (model, pid) of live local workers; ``set_priority`` applies a
        priority to them and ``unload_idle`` unloads the idle ones (the model pool's)."""
        self.settings = pressure_settings(config, psutil.virtual_memory().total)
        self.pressure = Pressure()
        self._yielded = (config.nice or None, config.cpus or None, config.threads or None)
        self._set_priority = set_priority if self._yielded != (None, None, None) else None
        self._unload_idle = unload_idle
        self._unloading: asyncio.Task[None] | None = None
        self._monitor = Monitor(Sampler(), config.sample_interval_s, workers, self.on_sample)

    @property
    def snapshot(self) -> ResourceSnapshot:
        return self._monitor.latest

    @property
    def yielding(self) -> bool:
        """Whether local workers run reniced/pinned now."""
        return self.pressure.cpu and self._set_priority is not None

    async def start(self) -> None:
        await self._monitor.start()

    async def aclose(self) -> None:
        await self._monitor.aclose()
        if self._unloading is not None:
            self._unloading.cancel()
        if self.yielding:
            self._yield(False)

    def on_sample(self, snap: ResourceSnapshot) -> None:
        before = self.pressure
        self.pressure = after = next_pressure(before, snap, self.settings)
        if after.cpu != before.cpu:
            self._yield(after.cpu)
        if (after.cpu, after.memory) != (before.cpu, before.memory):
            level = logging.WARNING if after.cpu or after.memory else logging.INFO
            log.log(level, "host pressure: %s", self._describe(snap),
                    extra=fields(event="host_pressure", cpu=after.cpu, memory=after.memory))
        if after.memory and not before.memory and self._unload_idle is not None:
            self._unloading = asyncio.create_task(self._give_memory_back(self._unload_idle))

    @staticmethod
    async def _give_memory_back(unload_idle: Callable[[], Awaitable[list[str]]]) -> None:
        try:
            names = await unload_idle()
        except Exception as e:  # nobody awaits this task: say it here
            log.error("host pressure: unloading idle local models failed: %r", e,
                      extra=fields(event="unload_failed"))
            return
        if names:
            log.info("host pressure: unloaded idle local models: %s", ", ".join(names),
                     extra=fields(event="unloaded", models=names))

    def _yield(self, on: bool) -> None:
        if self._set_priority is not None:
            self._set_priority(*(self._yielded if on else (None, None, None)))

    def _describe(self, snap: ResourceSnapshot) -> str:
        p = self.pressure
        if not p.reasons:
            return "none; local targets serve first again"
        parts = []
        if p.cpu:
            parts.append(f"cpu (others use {snap.others_cpu_percent:.0f}% of the CPU)")
        if p.memory:
            parts.append(f"memory ({snap.memory_available_bytes >> 20} MiB available, floor "
                         f"{self.settings.memory_floor_bytes >> 20} MiB)")
        tail = "; local targets offloaded where a route has remote ones"
        if self.yielding:
            tail += ", local workers yield the CPU"
        return ", ".join(parts) + tail
