"""The offload policy on synthetic snapshots: pressure state machine (hysteresis included),
local ETA, and how a route's targets are arranged. Pure functions: snapshot in, decision out."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from sidecar.host.pressure import LocalLoad, Pressure, PressureSettings, next_pressure
from sidecar.host.sampler import ResourceSnapshot
from sidecar.routing.planner import arrange, local_eta_s, waits_for_slot
from sidecar.routing.routes import Target

MIB = 1 << 20
S = PressureSettings(cpu_high_percent=85, cpu_contended_percent=40, cpu_low_percent=30,
                     pressure_after_s=5,
                     calm_after_s=10, memory_floor_bytes=1024 * MIB,
                     memory_margin_bytes=256 * MIB)


def snap(t: float, others: float = 0.0, available_mib: int = 8192,
         ours: float = 0.0) -> ResourceSnapshot:
    return ResourceSnapshot(
        taken_at=t, cpu_count=2, cpu_percent=others + ours, sidecar_cpu_percent=ours,
        others_cpu_percent=others, load_avg=(0.0, 0.0, 0.0),
        memory_total_bytes=16384 * MIB, memory_available_bytes=available_mib * MIB,
        swap_total_bytes=0, swap_used_bytes=0, workers=(), gpus=None,
    )


def run(samples: Sequence[ResourceSnapshot], settings: PressureSettings = S,
        start: Pressure | None = None) -> list[tuple[bool, bool]]:
    p = start or Pressure()
    out = []
    for s in samples:
        p = next_pressure(p, s, settings)
        out.append((p.cpu, p.memory))
    return out


OFF, CPU, MEM, BOTH = (False, False), (True, False), (False, True), (True, True)


@pytest.mark.parametrize(("cpu_by_second", "expected"), [
    # Idle host: never pressure.
    ([10, 10, 10, 10, 10, 10, 10], [OFF] * 7),
    # High for 5 s (samples at t=0..5): on exactly when it has lasted pressure_after_s.
    ([90, 90, 90, 90, 90, 90, 90], [OFF] * 5 + [CPU] * 2),
    # A spike shorter than the window, then calm: never on.
    ([95, 95, 95, 95, 50, 95, 95], [OFF] * 7),
    # The threshold itself counts as high.
    ([85, 85, 85, 85, 85, 85], [OFF] * 5 + [CPU]),
    # Just under: nothing.
    ([84.9] * 8, [OFF] * 8),
])
def test_cpu_pressure_needs_a_sustained_window(cpu_by_second: list[float],
                                               expected: list[tuple[bool, bool]]) -> None:
    assert run([snap(t, c) for t, c in enumerate(cpu_by_second)]) == expected


@pytest.mark.parametrize(("others", "ours", "on"), [
    # Local inference saturates the host and the app holds half of it: it would take more.
    (50, 50, True),
    (40, 50, True),       # the contended mark itself
    (39, 60, False),      # a light app next to busy local inference is not pressure
    (50, 30, False),      # the host is not saturated: the app gets what it wants
    (85, 0, True),        # the app alone at the high mark
    (0, 100, False),      # local inference alone never offloads itself
])
def test_cpu_contention_with_local_inference(others: float, ours: float, on: bool) -> None:
    got = run([snap(t, others, ours=ours) for t in range(6)])
    assert got == [OFF] * 5 + [CPU if on else OFF]


def test_cpu_pressure_ends_only_after_calm_window_below_low_mark() -> None:
    on = Pressure(cpu=True, changed_at=0.0)
    # 35% is below the contended mark but above the low mark: stays on (hysteresis).
    assert run([snap(t, 35) for t in range(30)], start=on) == [CPU] * 30
    # Below the low mark for 10 s: off at t=10 exactly, not before.
    assert run([snap(t, 20) for t in range(12)], start=on) == [CPU] * 10 + [OFF] * 2
    # A blip above the low mark restarts the calm window.
    cpu = [20] * 8 + [35] + [20] * 11
    assert run([snap(t, c) for t, c in enumerate(cpu)], start=on) == [CPU] * 19 + [OFF]


def test_hovering_around_one_threshold_does_not_flap() -> None:
    # Alternating 80/90 for a minute: crosses 85 every second but never sustains it.
    samples = [snap(t, 90 if t % 2 else 80) for t in range(60)]
    assert set(run(samples)) == {OFF}
    # Once on, alternating 25/35 (around the low mark) keeps it on.
    on = Pressure(cpu=True)
    samples = [snap(t, 25 if t % 2 else 35) for t in range(60)]
    assert set(run(samples, start=on)) == {CPU}


@pytest.mark.parametrize(("available", "expected"), [
    ([8192, 8192, 1023, 1023], [OFF, OFF, MEM, MEM]),   # below the floor: at once
    ([1024, 1024], [OFF, OFF]),                          # at the floor: fine
    ([500, 1100, 1200, 1279, 1279], [MEM] * 5),          # above the floor but within the margin
])
def test_memory_floor(available: list[int], expected: list[tuple[bool, bool]]) -> None:
    assert run([snap(t, 0, a) for t, a in enumerate(available)]) == expected


def test_memory_pressure_clears_after_calm_window_above_floor_plus_margin() -> None:
    on = Pressure(memory=True)
    samples = [snap(t, 0, 1280) for t in range(12)]  # floor + margin exactly
    assert run(samples, start=on) == [MEM] * 10 + [OFF] * 2
    # A dip back under floor + margin restarts the window.
    avail = [2000] * 5 + [1200] + [2000] * 11  # calm again from t=6: off at t=16
    assert run([snap(t, 0, a) for t, a in enumerate(avail)], start=on) == [MEM] * 16 + [OFF]


def test_memory_rule_off_without_a_floor() -> None:
    no_floor = PressureSettings(memory_floor_bytes=0)
    assert run([snap(0, 0, 1), snap(1, 0, 0)], no_floor) == [OFF, OFF]
    assert run([snap(0, 0, 1)], no_floor, start=Pressure(memory=True)) == [OFF]


def test_both_kinds_at_once_and_changed_at() -> None:
    samples = [snap(t, 95, 512) for t in range(7)]
    p = Pressure()
    seen = []
    for s in samples:
        p = next_pressure(p, s, S)
        seen.append(((p.cpu, p.memory), p.changed_at, p.reasons))
    assert seen[0] == (MEM, 0, ("memory",))
    assert seen[4] == (MEM, 0, ("memory",))
    assert seen[5] == (BOTH, 5, ("cpu", "memory"))
    assert seen[6] == (BOTH, 5, ("cpu", "memory"))


# --- local ETA ----------------------------------------------------------------------------

def load(**kw: object) -> LocalLoad:
    base: dict[str, object] = dict(loaded=True, in_flight=0, queued=0, n_parallel=4, ttft_s=0.2,
                                   decode_tps=20.0, avg_completion_tokens=40.0,
                                   avg_duration_s=3.0, load_s=1.5)
    base.update(kw)
    return LocalLoad(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "max_tokens", "expected"), [
    ({}, 100, 0.2 + 100 / 20),                            # idle: prefill + decode
    ({}, None, 0.2 + 40 / 20),                            # no limit: the usual answer length
    ({"in_flight": 3}, 100, 5.2),                         # a free slot: no wait
    ({"in_flight": 4}, 100, 5.2 + 3.0),                   # full: one wave ahead
    ({"in_flight": 4, "queued": 3}, 100, 5.2 + 3.0),      # 4th in line of 4 slots
    ({"in_flight": 4, "queued": 4}, 100, 5.2 + 6.0),      # 5th in line: two waves
    ({"loaded": False}, 100, 5.2 + 1.5),                  # must load first
    ({"decode_tps": None}, 100, None),                    # never measured: unknown
    ({"ttft_s": None}, 100, None),
])
def test_local_eta(kw: dict[str, object], max_tokens: int | None,
                   expected: float | None) -> None:
    eta = local_eta_s(load(**kw), max_tokens)
    assert eta == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(("kw", "waits"), [
    ({}, False),
    ({"in_flight": 3}, False),
    ({"in_flight": 4}, True),
    ({"in_flight": 2, "queued": 2}, True),
    ({"n_parallel": 0}, False),  # misreported: one slot at least
    ({"n_parallel": 0, "in_flight": 1}, True),
])
def test_waits_for_slot(kw: dict[str, object], waits: bool) -> None:
    assert waits_for_slot(load(**kw)) is waits


# --- arranging a route's targets ----------------------------------------------------------

L1, L2 = Target("local", "small"), Target("local", "big")
R1, R2 = Target("openai", "gpt"), Target("claude", "haiku")
CALM, HOT, LOW_MEM = Pressure(), Pressure(cpu=True), Pressure(memory=True)


def never(t: Target) -> bool:
    return False


@pytest.mark.parametrize(("ordered", "prefer", "pressure", "slow", "order", "reasons"), [
    # Preference groups targets, keeping the strategy's order inside each group.
    ([R1, L1, R2, L2], "local", CALM, set(), [L1, L2, R1, R2], ()),
    ([L1, R1, L2, R2], "remote", CALM, set(), [R1, R2, L1, L2], ()),
    ([R1, L1], None, CALM, set(), [R1, L1], ()),
    # Local-first under pressure: local moves behind remote, named by the pressure kind.
    ([L1, R1], "local", HOT, set(), [R1, L1], ("offload:cpu",)),
    ([L1, L2, R1], "local", LOW_MEM, set(), [R1, L1, L2], ("offload:memory",)),
    ([L1, R1], "local", Pressure(cpu=True, memory=True), set(), [R1, L1],
     ("offload:cpu", "offload:memory")),
    # Listed local first with no preference is local-first too.
    ([L1, R1], None, HOT, set(), [R1, L1], ("offload:cpu",)),
    # Remote-first: nothing to offload (local is already the fallback).
    ([L1, R1], "remote", HOT, set(), [R1, L1], ()),
    # Local-only route: nowhere to offload; local serves (and yields the CPU instead).
    ([L1, L2], "local", HOT, set(), [L1, L2], ()),
    # Remote-only route: untouched.
    ([R1, R2], "local", HOT, set(), [R1, R2], ()),
    # Queue too long for the deadline: only the slow local target moves.
    ([L1, L2, R1], "local", CALM, {L1}, [L2, R1, L1], ("offload:queue",)),
    ([L1, R1], "local", CALM, {L1}, [R1, L1], ("offload:queue",)),
    # A slow local target that is already behind every remote one is not an offload.
    ([R1, L1], None, CALM, {L1}, [R1, L1], ()),
])
def test_arrange(ordered: list[Target], prefer: str | None, pressure: Pressure,
                 slow: set[Target], order: list[Target], reasons: tuple[str, ...]) -> None:
    got = arrange(ordered, prefer, pressure, lambda t: t in slow)
    assert list(got.order) == order
    assert got.reasons == reasons


def test_arrange_asks_about_speed_only_when_calm_and_local_is_ahead() -> None:
    asked: list[Target] = []

    def slow(t: Target) -> bool:
        asked.append(t)
        return False

    arrange([L1, R1], "local", HOT, slow)
    arrange([R1, R2], "local", CALM, slow)
    assert asked == []
    arrange([L1, R1, L2], None, CALM, slow)
    assert asked == [L1]
