"""Measurement-driven strategies (least-busy, latency, cost) and the tracker feeding them."""

from __future__ import annotations

import math

import pytest

from sidecar.routing.routes import Target
from sidecar.routing.strategies import (
    TargetStats,
    TargetTracker,
    by_cost,
    by_latency,
    least_busy,
)


def targets(names: str) -> list[Target]:
    """``"abc"`` -> targets ``p/a``, ``p/b``, ``p/c`` in that order."""
    return [Target("p", n) for n in names]


def order(result: list[Target]) -> str:
    return "".join(t.model for t in result)


S = TargetStats


# --- least_busy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "stats", "expected"),
    [
        ("", {}, ""),
        ("a", {}, "a"),
        ("a", {"p/a": S(in_flight=5)}, "a"),
        ("abc", {}, "abc"),  # nothing known: listed order
        ("abc", {"p/a": S(in_flight=2), "p/b": S(in_flight=1), "p/c": S(in_flight=0)}, "cba"),
        ("abc", {"p/a": S(in_flight=1), "p/b": S(in_flight=1), "p/c": S(in_flight=1)}, "abc"),
        ("abc", {"p/a": S(in_flight=3), "p/b": S(in_flight=1), "p/c": S(in_flight=1)}, "bca"),
        # missing keys count 0 and keep their listed order among themselves
        ("abcd", {"p/a": S(in_flight=1), "p/c": S(in_flight=2)}, "bdac"),
        # latency does not matter to least_busy
        ("ab", {"p/a": S(ttft_s=9.0, total_s=9.0), "p/b": S(in_flight=1, total_s=0.1)}, "ab"),
        # stats for targets not in the route are ignored
        ("ba", {"p/z": S(in_flight=7), "p/b": S(in_flight=1)}, "ab"),
    ],
)
def test_least_busy(names: str, stats: dict[str, TargetStats], expected: str) -> None:
    assert order(least_busy(targets(names), stats)) == expected


def test_least_busy_keeps_duplicate_models_per_provider_apart() -> None:
    ts = [Target("a", "m"), Target("b", "m")]
    assert least_busy(ts, {"a/m": S(in_flight=1)}) == [Target("b", "m"), Target("a", "m")]


# --- by_latency --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "stats", "stream", "expected"),
    [
        ("", {}, False, ""),
        ("", {}, True, ""),
        ("a", {"p/a": S(ttft_s=1.0, total_s=2.0)}, True, "a"),
        ("abc", {}, False, "abc"),
        ("abc", {}, True, "abc"),
        # non-stream: total_s decides
        ("abc", {"p/a": S(ttft_s=0.1, total_s=3.0), "p/b": S(ttft_s=0.9, total_s=1.0),
                 "p/c": S(ttft_s=0.5, total_s=2.0)}, False, "bca"),
        # stream: ttft_s decides on the same stats
        ("abc", {"p/a": S(ttft_s=0.1, total_s=3.0), "p/b": S(ttft_s=0.9, total_s=1.0),
                 "p/c": S(ttft_s=0.5, total_s=2.0)}, True, "acb"),
        # never-measured (missing, or both None) first, in listed order
        ("abcd", {"p/a": S(total_s=0.1), "p/c": S(total_s=0.2), "p/d": S(in_flight=3)},
         False, "bdac"),
        ("abcd", {"p/a": S(ttft_s=0.1), "p/c": S(ttft_s=0.2), "p/d": S(samples=0)},
         True, "bdac"),
        # stream falls back to total_s when ttft_s unmeasured
        ("abc", {"p/a": S(ttft_s=0.5), "p/b": S(total_s=0.3), "p/c": S(ttft_s=0.4)},
         True, "bca"),
        # non-stream falls back to ttft_s when total_s unmeasured
        ("abc", {"p/a": S(total_s=0.5), "p/b": S(ttft_s=0.3), "p/c": S(total_s=0.4)},
         False, "bca"),
        # preferred metric wins over the other when both are known
        ("ab", {"p/a": S(ttft_s=0.1, total_s=5.0), "p/b": S(ttft_s=0.2, total_s=0.3)},
         False, "ba"),
        ("ab", {"p/a": S(ttft_s=0.2, total_s=0.3), "p/b": S(ttft_s=0.1, total_s=5.0)},
         True, "ba"),
        # ties keep listed order
        ("abc", {"p/a": S(total_s=1.0), "p/b": S(total_s=0.5), "p/c": S(total_s=0.5)},
         False, "bca"),
        ("cba", {"p/a": S(total_s=1.0), "p/b": S(total_s=0.5), "p/c": S(total_s=0.5)},
         False, "cba"),
        # zero latency is measured (not "unmeasured"): sorts after never-measured
        ("ab", {"p/a": S(total_s=0.0)}, False, "ba"),
        # in-flight does not matter to by_latency
        ("ab", {"p/a": S(in_flight=9, total_s=0.1), "p/b": S(total_s=0.2)}, False, "ab"),
    ],
)
def test_by_latency(names: str, stats: dict[str, TargetStats], stream: bool,
                    expected: str) -> None:
    assert order(by_latency(targets(names), stats, stream=stream)) == expected


# --- by_cost -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "costs", "expected"),
    [
        ("", {}, ""),
        ("a", {}, "a"),
        ("a", {"p/a": 100}, "a"),
        ("abc", {}, "abc"),  # all unknown: listed order
        ("abc", {"p/a": 300, "p/b": 100, "p/c": 200}, "bca"),
        ("abc", {"p/a": 300, "p/b": 0, "p/c": 200}, "bca"),  # free/local first
        # unknown (None or missing) after every known price, in listed order
        ("abcd", {"p/a": None, "p/b": 10**9, "p/d": 5}, "dbac"),
        ("abcd", {"p/a": None, "p/c": None}, "abcd"),
        # ties keep listed order
        ("abc", {"p/a": 50, "p/b": 50, "p/c": 10}, "cab"),
        ("bac", {"p/a": 50, "p/b": 50, "p/c": 50}, "bac"),
        # 0 is a known price, not "unknown"
        ("ab", {"p/a": None, "p/b": 0}, "ba"),
    ],
)
def test_by_cost(names: str, costs: dict[str, int | None], expected: str) -> None:
    assert order(by_cost(targets(names), costs)) == expected


@pytest.mark.parametrize("strategy", ["least_busy", "by_latency", "by_cost"])
def test_strategies_return_new_list_and_leave_input_alone(strategy: str) -> None:
    ts = targets("abc")
    before = list(ts)
    if strategy == "least_busy":
        result = least_busy(ts, {"p/a": S(in_flight=2)})
    elif strategy == "by_latency":
        result = by_latency(ts, {"p/a": S(total_s=2.0)}, stream=False)
    else:
        result = by_cost(ts, {"p/a": 5, "p/b": 9})
    assert ts == before
    assert result is not ts
    assert sorted(result, key=lambda t: t.model) == before  # a permutation, nothing lost


def test_strategies_accept_tuples() -> None:
    ts = tuple(targets("ab"))
    assert order(least_busy(ts, {"p/a": S(in_flight=1)})) == "ba"
    assert order(by_latency(ts, {"p/a": S(ttft_s=1.0)}, stream=True)) == "ba"
    assert order(by_cost(ts, {"p/a": 2, "p/b": 1})) == "ba"


# --- TargetTracker -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "samples", "expected"),
    [
        (0.3, [2.0], 2.0),
        (0.3, [2.0, 1.0], 1.7),  # 2 + 0.3 * (1 - 2)
        (0.3, [2.0, 1.0, 4.0], 2.39),  # 1.7 + 0.3 * (4 - 1.7)
        (0.5, [1.0, 3.0], 2.0),
        (0.5, [1.0, 3.0, 0.0], 1.0),
        (1.0, [1.0, 3.0, 7.0], 7.0),  # alpha 1: last sample
        (0.3, [0.0, 10.0], 3.0),  # a 0 first sample is a real sample
        (0.3, [5.0, 5.0, 5.0], 5.0),
    ],
)
def test_tracker_ewma(alpha: float, samples: list[float], expected: float) -> None:
    tr = TargetTracker(alpha=alpha)
    for x in samples:
        tr.completed("p/a", x)
        tr.first_byte("p/b", x)
    assert tr.get("p/a").total_s == pytest.approx(expected, abs=1e-12)
    assert tr.get("p/a").samples == len(samples)
    assert tr.get("p/a").ttft_s is None
    assert tr.get("p/b").ttft_s == pytest.approx(expected, abs=1e-12)
    assert tr.get("p/b").total_s is None
    assert tr.get("p/b").samples == 0  # ttft samples don't count


def test_tracker_default_alpha_is_0_3() -> None:
    tr = TargetTracker()
    tr.completed("k", 10.0)
    tr.completed("k", 0.0)
    assert tr.get("k").total_s == pytest.approx(7.0, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, math.nan])
def test_tracker_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        TargetTracker(alpha=alpha)


@pytest.mark.parametrize("bad", [-0.001, -5.0, math.nan, math.inf, -math.inf])
def test_tracker_ignores_bad_samples(bad: float) -> None:
    tr = TargetTracker()
    tr.completed("k", bad)
    tr.first_byte("k", bad)
    assert tr.get("k") == TargetStats()
    tr.completed("k", 2.0)
    tr.first_byte("k", 1.0)
    tr.completed("k", bad)
    tr.first_byte("k", bad)
    assert tr.get("k") == TargetStats(ttft_s=1.0, total_s=2.0, samples=1)


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ("", 0),
        ("s", 1),
        ("sss", 3),
        ("ssf", 1),
        ("ssff", 0),
        ("f", 0),  # finished before any start: never below 0
        ("sfff", 0),
        ("sfffs", 1),  # extra finishes don't bank credit
        ("ffsss", 3),
    ],
)
def test_tracker_in_flight(events: str, expected: int) -> None:
    tr = TargetTracker()
    for e in events:
        tr.started("k") if e == "s" else tr.finished("k")
    assert tr.get("k").in_flight == expected


def test_tracker_in_flight_keeps_latency() -> None:
    tr = TargetTracker()
    tr.completed("k", 1.0)
    tr.first_byte("k", 0.5)
    tr.started("k")
    tr.started("k")
    tr.finished("k")
    assert tr.get("k") == TargetStats(in_flight=1, ttft_s=0.5, total_s=1.0, samples=1)


def test_tracker_keys_are_independent() -> None:
    tr = TargetTracker()
    tr.started("a/x")
    tr.completed("b/y", 3.0)
    assert tr.get("a/x") == TargetStats(in_flight=1)
    assert tr.get("b/y") == TargetStats(total_s=3.0, samples=1)


def test_tracker_unknown_key() -> None:
    tr = TargetTracker()
    assert tr.get("nope") == TargetStats()
    assert tr.stats() == {}
    tr.finished("nope")
    assert tr.get("nope") == TargetStats()


def test_tracker_stats_is_a_snapshot() -> None:
    tr = TargetTracker()
    tr.started("k")
    tr.completed("k", 2.0)
    snap = tr.stats()
    before = snap["k"]
    held = tr.get("k")
    tr.started("k")
    tr.completed("k", 4.0)
    tr.first_byte("k", 1.0)
    tr.started("new")
    assert before == TargetStats(in_flight=1, total_s=2.0, samples=1)
    assert held == before
    assert snap["k"] is before
    assert "new" not in snap
    assert tr.get("k") == TargetStats(in_flight=2, ttft_s=1.0, total_s=pytest.approx(2.6),
                                      samples=2)
    assert set(tr.stats()) == {"k", "new"}


def test_tracker_stats_feed_the_strategies() -> None:
    tr = TargetTracker()
    tr.started("p/a")
    tr.completed("p/b", 0.2)
    tr.completed("p/c", 0.1)
    ts = targets("abcd")
    assert order(least_busy(ts, tr.stats())) == "bcda"
    assert order(by_latency(ts, tr.stats(), stream=False)) == "adcb"
    assert order(by_latency(ts, tr.stats(), stream=True)) == "adcb"  # falls back to total_s


def test_target_stats_is_frozen() -> None:
    s = TargetStats()
    with pytest.raises(AttributeError):
        s.in_flight = 1  # type: ignore[misc]
