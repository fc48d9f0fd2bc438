"""HostWatch: the pressure state fed by snapshots, and what it asks of local workers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from sidecar.config import ResourcesConfig
from sidecar.host.sampler import ResourceSnapshot
from sidecar.host.watch import HostWatch, memory_floor_bytes

GIB = 1 << 30


def snap(t: float, others: float, available: int = 8 * GIB) -> ResourceSnapshot:
    return ResourceSnapshot(
        taken_at=t, cpu_count=2, cpu_percent=others, sidecar_cpu_percent=0.0,
        others_cpu_percent=others, load_avg=(0.0, 0.0, 0.0), memory_total_bytes=16 * GIB,
        memory_available_bytes=available, swap_total_bytes=0, swap_used_bytes=0, workers=(),
        gpus=None,
    )


Call = tuple[int | None, tuple[int, ...] | None, int | None]


def watch(config: ResourcesConfig) -> tuple[HostWatch, list[Call]]:
    calls: list[Call] = []

    def set_priority(nice: int | None, cpus: Sequence[int] | None, threads: int | None
                     ) -> None:
        calls.append((nice, None if cpus is None else tuple(cpus), threads))

    return HostWatch(config, set_priority=set_priority), calls


def test_workers_yield_while_cpu_pressure_lasts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="sidecar.host")
    w, calls = watch(ResourcesConfig(pressure_after_s=2, calm_after_s=3, cpus=(1,)))
    for t in range(2):
        w.on_sample(snap(t, 95))
    assert calls == [] and not w.yielding
    w.on_sample(snap(2, 95))
    assert calls == [(10, (1,), 1)] and w.yielding and w.pressure.cpu
    for t in range(3, 6):
        w.on_sample(snap(t, 10))
    assert w.pressure.cpu and len(calls) == 1  # calm for 2 s of 3: still yielding
    w.on_sample(snap(6, 10))
    assert calls[1:] == [(None, None, None)] and not w.yielding and not w.pressure.cpu
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "host pressure: cpu (others use 95% of the CPU); local targets offloaded "
        "where a route has remote ones, local workers yield the CPU"),
        ("INFO", "host pressure: none; local targets serve first again"),
    ]


def test_memory_pressure_offloads_but_does_not_renice() -> None:
    w, calls = watch(ResourcesConfig(memory_floor_mb=1024))
    w.on_sample(snap(0, 0, available=GIB // 2))
    assert w.pressure.memory and not w.pressure.cpu
    assert calls == [] and not w.yielding


def test_nothing_to_yield_when_disabled() -> None:
    w, calls = watch(ResourcesConfig(pressure_after_s=0, nice=0, threads=0))
    w.on_sample(snap(0, 99))
    assert w.pressure.cpu and calls == [] and not w.yielding


@pytest.mark.parametrize(("floor_mb", "total", "expected"), [
    (None, 32 * GIB, 2 * GIB),            # 10 % of RAM, at most 2 GiB
    (None, 4 * GIB, 4 * GIB // 10),
    (0, 16 * GIB, 0),                     # no floor
    (512, 16 * GIB, 512 << 20),
])
def test_memory_floor_default(floor_mb: int | None, total: int, expected: int) -> None:
    assert memory_floor_bytes(ResourcesConfig(memory_floor_mb=floor_mb), total) == expected


async def test_memory_pressure_unloads_idle_models_once(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="sidecar.host")
    unloaded = asyncio.Event()
    calls = 0

    async def unload_idle() -> list[str]:
        nonlocal calls
        calls += 1
        unloaded.set()
        return ["big"]

    w = HostWatch(ResourcesConfig(memory_floor_mb=1024), unload_idle=unload_idle)
    w.on_sample(snap(0, 0, available=GIB // 2))
    w.on_sample(snap(1, 0, available=GIB // 2))  # still under pressure: not again
    async with asyncio.timeout(5):
        await unloaded.wait()
    await w.aclose()
    assert calls == 1
    assert "unloaded idle local models: big" in caplog.text
