"""Route strategies: the first ordering rule of the planner, and the tracker feeding them.

:func:`by_strategy` orders a route's targets by its ``strategy``: ``priority`` keeps the
listed order, ``weighted`` samples by weight from the given random source, and the
measurement-driven ones dispatch to the functions below. They are pure functions: each
takes a route's targets (in listed order) and a snapshot of what is known about them, and
returns a new list holding every target exactly once, best first. They do no I/O, read no
clock and keep no state, so the same inputs always give the same order (``weighted``: the
same draws). Every sort is stable: targets that compare equal keep their listed
order, so a route's listing remains the tie-breaker (and the whole order when nothing has
been measured yet).

- :func:`least_busy`: fewest attempts in flight first.
- :func:`by_latency`: lowest latency EWMA first (time to first byte for stream requests,
  total latency otherwise); never-measured targets go first so each is measured once.
- :func:`by_cost`: cheapest estimated cost (integer micro-dollars) first; unknown prices last.
  The ``cascade`` strategy orders its targets the same way (its escalation is the
  gateway's, judged by :mod:`sidecar.routing.cascade`).

:class:`TargetTracker` is the state behind the snapshots: in-flight counts and latency
EWMAs per target key (``provider/model``). It is a plain object driven from one event loop
thread (no locks, not thread-safe); :meth:`TargetTracker.stats` hands out immutable
:class:`TargetStats` values, so a snapshot taken for one decision never changes under it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import msgspec

from sidecar.routing.routes import Route, Target


class TargetStats(msgspec.Struct, frozen=True):
    """What the gateway has measured about one target (immutable view)."""

    in_flight: int = 0
    """Attempts running now (streams count until they end)."""
    ttft_s: float | None = None
    """EWMA of time to first token/byte of the answer; ``None``: never measured."""
    total_s: float | None = None
    """EWMA of total latency of completed attempts; ``None``: never measured."""
    samples: int = 0
    """Completed attempts measured (total latency samples taken)."""


_UNMEASURED = TargetStats()


def least_busy(targets: Sequence[Target], stats: Mapping[str, TargetStats]) -> list[Target]:
    """Fewest in-flight first; ties keep the listed order (stable). Targets missing from
    ``stats`` count 0."""
    return sorted(targets, key=lambda t: stats.get(t.key, _UNMEASURED).in_flight)


def by_latency(targets: Sequence[Target], stats: Mapping[str, TargetStats], *,
               stream: bool) -> list[Target]:
    """Lowest EWMA first: ``ttft_s`` for stream requests, ``total_s`` otherwise (falling back
    to the other one when the preferred is unmeasured). Never-measured targets (neither
    metric known, or missing from ``stats``) come first, in listed order, so every target gets
    measured once; ties keep listed order."""

    def rank(target: Target) -> tuple[int, float]:
        s = stats.get(target.key, _UNMEASURED)
        first, second = (s.ttft_s, s.total_s) if stream else (s.total_s, s.ttft_s)
        value = first if first is not None else second
        return (0, 0.0) if value is None else (1, value)

    return sorted(targets, key=rank)


def by_cost(targets: Sequence[Target], costs: Mapping[str, int | None]) -> list[Target]:
    """Cheapest first by the estimated cost in integer micro-dollars of this request on each
    target (computed by the caller from the price table; 0 for local/free targets). ``None``
    or missing (price unknown) sorts after every known price, in listed order. Ties keep
    listed order."""

    def rank(target: Target) -> tuple[int, int]:
        cost = costs.get(target.key)
        return (1, 0) if cost is None else (0, cost)

    return sorted(targets, key=rank)


def by_strategy(route: Route, rng: random.Random, *,
                stats: Mapping[str, TargetStats] | None = None,
                costs: Mapping[str, int | None] | None = None,
                stream: bool = False) -> list[Target]:
    """``route``'s targets in the order its strategy gives for one request: ``stats`` feed
    the least-busy and latency strategies, ``costs`` (µ$ of this request per target key)
    the cost and cascade strategies; missing measurements leave the listed order.
    ``weighted`` draws from ``rng`` (one draw per target, for routes of two targets or
    more): weighted sampling without replacement, so every target stays in the order as
    a fallback."""
    targets = route.targets
    if len(targets) < 2:
        return list(targets)
    match route.strategy:
        case "weighted":
            # Efraimidis-Spirakis: sort by u ** (1 / w).
            return sorted(targets, key=lambda t: rng.random() ** (1.0 / t.weight), reverse=True)
        case "least-busy":
            return least_busy(targets, stats or {})
        case "latency":
            return by_latency(targets, stats or {}, stream=stream)
        case "cost" | "cascade":
            return by_cost(targets, costs or {})
    return list(targets)


class TargetTracker:
    """Per-target in-flight counts and latency EWMAs, fed by the gateway from one event loop
    (no locks; not thread-safe). ``alpha`` is the EWMA weight of a new sample (default 0.3):
    the first sample sets the average, each later one moves it by ``alpha * (x - average)``.

    Latency samples that are negative, NaN or infinite are ignored, so a clock quirk never
    poisons an average. Each target's state is held as an immutable :class:`TargetStats`
    replaced on every update, which makes :meth:`stats` a cheap shallow copy.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self._alpha = alpha
        self._stats: dict[str, TargetStats] = {}

    def _ewma(self, current: float | None, sample: float) -> float:
        return sample if current is None else current + self._alpha * (sample - current)

    def started(self, key: str) -> None:
        """An attempt on ``key`` began: ``in_flight += 1``."""
        s = self.get(key)
        self._stats[key] = msgspec.structs.replace(s, in_flight=s.in_flight + 1)

    def finished(self, key: str) -> None:
        """An attempt on ``key`` ended (whatever its outcome): ``in_flight -= 1``, never below 0."""
        s = self._stats.get(key)
        if s is not None and s.in_flight > 0:
            self._stats[key] = msgspec.structs.replace(s, in_flight=s.in_flight - 1)

    def first_byte(self, key: str, seconds: float) -> None:
        """A time-to-first-byte sample for ``key``; does not count in ``samples``."""
        if not _valid(seconds):
            return
        s = self.get(key)
        self._stats[key] = msgspec.structs.replace(s, ttft_s=self._ewma(s.ttft_s, seconds))

    def completed(self, key: str, seconds: float) -> None:
        """A total-latency sample for a completed attempt on ``key``: ``samples += 1``."""
        if not _valid(seconds):
            return
        s = self.get(key)
        self._stats[key] = msgspec.structs.replace(
            s, total_s=self._ewma(s.total_s, seconds), samples=s.samples + 1)

    def stats(self) -> Mapping[str, TargetStats]:
        """A snapshot of every target seen so far (a new dict each call): later updates
        change neither the mapping nor the :class:`TargetStats` in it."""
        return dict(self._stats)

    def get(self, key: str) -> TargetStats:
        """The current stats of ``key``; ``TargetStats()`` when never seen."""
        return self._stats.get(key, _UNMEASURED)


def _valid(seconds: float) -> bool:
    return math.isfinite(seconds) and seconds >= 0.0
