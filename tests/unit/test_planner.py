"""The planner's rules on synthetic inputs: strategy, preference, offload under pressure or a
long queue, and which local fallbacks are tried only when they can answer in time."""

from __future__ import annotations

import math
import random

import pytest

from sidecar.config import Strategy
from sidecar.host import LocalLoad, Pressure
from sidecar.routing import Plan, Route, Target, TargetStats, TooSlow, plan, too_slow

L1, L2 = Target("local", "small"), Target("local", "big")
R1, R2 = Target("openai", "gpt"), Target("claude", "haiku")
CALM, HOT, LOW_MEM = Pressure(), Pressure(cpu=True), Pressure(memory=True)


def route(*targets: Target, strategy: Strategy = "priority",
          prefer: str | None = None) -> Route:
    return Route("r", strategy, targets, 0, prefer)


def load(**kw: object) -> LocalLoad:
    """20 tokens/s after 0.2 s to the first token, 4 slots, 3 s per answer."""
    base: dict[str, object] = dict(loaded=True, in_flight=0, queued=0, n_parallel=4, ttft_s=0.2,
                                   decode_tps=20.0, avg_completion_tokens=40.0,
                                   avg_duration_s=3.0, load_s=1.5)
    base.update(kw)
    return LocalLoad(**base)  # type: ignore[arg-type]


FULL = load(in_flight=4)  # every slot busy: a new request waits one wave (3 s) more
"""100 tokens: 0.2 + 5 + 3 = 8.2 s."""
FREE = load()
"""100 tokens: 0.2 + 5 = 5.2 s."""


def keys(p: Plan) -> list[str]:
    return [t.key for t in p.targets]


def planned(r: Route, **kw: object) -> Plan:
    return plan(r, random.Random(1), **kw)  # type: ignore[arg-type]


# --- strategy and preference ---------------------------------------------------------------

def test_nothing_known_keeps_the_listed_order_and_says_nothing() -> None:
    p = planned(route(R1, L1, R2))
    assert keys(p) == ["openai/gpt", "local/small", "claude/haiku"]
    assert p.reasons == ()
    assert [s.moved for s in p.steps] == [(), (), ()]


def test_the_strategy_orders_first_and_preference_groups_after_it() -> None:
    stats = {R1.key: TargetStats(in_flight=3), R2.key: TargetStats(in_flight=1),
             L1.key: TargetStats(in_flight=2)}
    r = route(R1, L1, R2, strategy="least-busy")
    assert keys(planned(r, stats=stats)) == ["claude/haiku", "local/small", "openai/gpt"]
    r = route(R1, L1, R2, strategy="least-busy", prefer="local")
    assert keys(planned(r, stats=stats)) == ["local/small", "claude/haiku", "openai/gpt"]
    costs = {R1.key: 10, R2.key: 5, L1.key: 0}
    r = route(R1, R2, L1, strategy="cost", prefer="remote")
    assert keys(planned(r, costs=costs)) == ["claude/haiku", "openai/gpt", "local/small"]


def test_weighted_draws_from_the_given_random_source() -> None:
    r = route(Target("a", "x", 1.0), Target("b", "y", 1.0), strategy="weighted")
    firsts = {keys(planned(r))[0] for _ in range(3)}
    assert len(firsts) == 1  # the same seed: the same order
    seen = {keys(plan(r, random.Random(seed)))[0] for seed in range(40)}
    assert seen == {"a/x", "b/y"}


def test_latency_ranks_stream_requests_by_time_to_first_byte() -> None:
    stats = {R1.key: TargetStats(ttft_s=0.1, total_s=3.0),
             R2.key: TargetStats(ttft_s=0.5, total_s=1.0)}
    r = route(R1, R2, strategy="latency")
    assert keys(planned(r, stats=stats)) == ["claude/haiku", "openai/gpt"]
    assert keys(planned(r, stats=stats, stream=True)) == ["openai/gpt", "claude/haiku"]


# --- offload ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("pressure", "reasons"), [
    (HOT, ("offload:cpu",)),
    (LOW_MEM, ("offload:memory",)),
    (Pressure(cpu=True, memory=True), ("offload:cpu", "offload:memory")),
])
def test_pressure_moves_every_local_target_behind_the_remote_ones(
        pressure: Pressure, reasons: tuple[str, ...]) -> None:
    p = planned(route(L1, L2, R1, prefer="local"), pressure=pressure,
                loads={L1.key: FREE, L2.key: FREE})
    assert keys(p) == ["openai/gpt", "local/small", "local/big"]
    assert p.reasons == reasons
    assert [s.moved for s in p.steps] == [(), reasons, reasons]


def test_pressure_leaves_remote_first_and_local_only_routes_alone() -> None:
    assert planned(route(L1, R1, prefer="remote"), pressure=HOT).reasons == ()
    p = planned(route(L1, L2), pressure=HOT)
    assert (keys(p), p.reasons) == (["local/small", "local/big"], ())


def test_a_queue_that_misses_the_deadline_offloads_only_that_target() -> None:
    loads = {L1.key: FULL, L2.key: FREE}
    p = planned(route(L1, L2, R1, prefer="local"), loads=loads, left_s=6.0, max_tokens=100)
    assert keys(p) == ["local/big", "openai/gpt", "local/small"]
    assert p.reasons == ("offload:queue",)
    assert [s.moved for s in p.steps] == [(), (), ("offload:queue",)]


def test_a_free_slot_keeps_the_local_first_choice_however_long_the_answer() -> None:
    # 1,500 tokens take 75 s, far past the deadline, but the answer may end early.
    p = planned(route(L1, R1, prefer="local"), loads={L1.key: FREE}, left_s=2.0,
                max_tokens=1500)
    assert keys(p) == ["local/small", "openai/gpt"]
    assert p.reasons == ()


def test_a_queue_in_time_or_unmeasured_is_not_an_offload() -> None:
    r = route(L1, R1, prefer="local")
    assert planned(r, loads={L1.key: FULL}, left_s=9.0, max_tokens=100).reasons == ()
    unmeasured = load(in_flight=4, decode_tps=None)
    assert planned(r, loads={L1.key: unmeasured}, left_s=0.1).reasons == ()
    assert planned(r, left_s=0.1).reasons == ()  # no load reported at all


# --- the deadline: first choice vs fallback ---------------------------------------------------

def test_only_later_local_steps_are_in_time_only() -> None:
    p = planned(route(L1, R1, L2, R2))
    assert [s.in_time_only for s in p.steps] == [False, False, True, False]
    # Offloaded, the local first choice becomes a fallback like any other.
    p = planned(route(L1, L2, R1), pressure=HOT)
    assert keys(p) == ["openai/gpt", "local/small", "local/big"]
    assert [s.in_time_only for s in p.steps] == [False, True, True]


def test_the_first_choice_is_tried_even_when_too_slow() -> None:
    p = planned(route(L1, R1), loads={L1.key: FREE}, left_s=1.0, max_tokens=100)
    assert keys(p)[0] == "local/small"
    assert p.too_slow(0, FREE, 1.0) is None


def test_a_local_fallback_is_skipped_when_it_cannot_answer_in_time() -> None:
    p = planned(route(R1, L1), max_tokens=100)
    # Strict, unlike the offload rule: a free slot that needs 5.2 s misses a 2 s deadline.
    assert p.too_slow(1, FREE, 2.0) == TooSlow(
        target=L1, eta_s=pytest.approx(5.2), left_s=2.0, in_flight=0, queued=0,
        decode_tps=20.0)
    assert p.too_slow(1, FREE, 6.0) is None  # in time
    assert p.too_slow(1, None, 0.0) is None  # not measured: assumed in time
    assert p.too_slow(0, FREE, 0.0) is None  # a remote step: never a local judgement


def test_the_fallback_judgement_uses_the_values_given_when_its_turn_comes() -> None:
    p = planned(route(R1, L1), loads={L1.key: FREE}, left_s=60.0, max_tokens=100)
    assert p.too_slow(1, FREE, 60.0) is None
    late = p.too_slow(1, FULL, 8.0)  # the queue grew and time passed meanwhile
    assert late is not None
    assert (late.eta_s, late.in_flight, late.left_s) == (pytest.approx(8.2), 4, 8.0)


def test_without_max_tokens_the_usual_answer_length_counts() -> None:
    p = planned(route(R1, L1))
    assert p.max_tokens is None
    assert p.too_slow(1, FREE, 2.1) is not None  # 0.2 + 40 / 20 = 2.2 s
    assert p.too_slow(1, FREE, 2.3) is None


@pytest.mark.parametrize(("target", "kw", "left_s", "late"), [
    (R1, {}, 0.0, False),                        # remote: never
    (L1, {}, 5.0, True),                         # 5.2 s needed
    (L1, {}, 5.2, False),                        # exactly in time
    (L1, {"only_if_queued": True}, 0.1, False),  # free slot: not for the offload rule
    (L1, {"load": FULL, "only_if_queued": True}, 8.0, True),
    (L1, {"load": load(loaded=False)}, 6.0, True),  # must load first: 1.5 s more
    (L1, {"load": None}, 0.0, False),
    (L1, {"load": load(decode_tps=0.0)}, 0.0, False),
])
def test_too_slow(target: Target, kw: dict[str, object], left_s: float, late: bool) -> None:
    given = kw.get("load", FREE)
    assert given is None or isinstance(given, LocalLoad)
    got = too_slow(target, given, 100, left_s, only_if_queued=bool(kw.get("only_if_queued")))
    assert (got is not None) is late
    if got is not None:
        assert got.target == target and got.left_s == left_s and got.eta_s > left_s


def test_defaults_are_calm_with_no_deadline() -> None:
    p = plan(route(L1, R1), random.Random(0), loads={L1.key: FULL})
    assert (keys(p), p.reasons) == (["local/small", "openai/gpt"], ())
    p = plan(route(R1, L1), random.Random(0))
    assert p.too_slow(1, FULL, math.inf) is None
    assert p.too_slow(1, FULL, 1.0) is not None
