"""Rate limits: GCRA (the generic cell rate algorithm), in memory or shared.

A limit is a rate (units per second: requests, or tokens) and a burst (units that may be
taken at once). GCRA keeps one number per key, the theoretical arrival time (TAT): taking
``cost`` units moves it ``cost / rate`` seconds later, and is allowed while it stays within
``burst / rate`` seconds of now. No window boundaries, so no double bursts at minute edges.

Every limiter implements :class:`RateLimiter` with the same semantics:

* :meth:`~RateLimiter.acquire` takes ``cost`` units if they fit and returns 0, or takes
  nothing and returns the seconds until they would fit (an accurate ``Retry-After``).
  A cost above the burst can never fit: it returns ``inf``.
* :meth:`~RateLimiter.charge` takes units unconditionally (may go into debt), for
  corrections once the real token count is known.
* :meth:`~RateLimiter.block` makes every acquire on a key wait until ``until_s`` from now
  (a provider said its limit is reached until then).

Limiters raise :class:`LimiterUnavailable` when shared state cannot be reached.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

import msgspec


class LimiterUnavailable(Exception):
    pass


class Rate(msgspec.Struct, frozen=True):
    per_s: float
    burst: float

    @classmethod
    def per_minute(cls, n: float, burst: float | None = None) -> Rate:
        """``n`` per minute; the burst defaults to a sixth of it (10 s worth), at least 1."""
        return cls(n / 60.0, burst if burst is not None else max(1.0, n / 6.0))


class RateLimiter(Protocol):
    async def acquire(self, key: str, rate: Rate, cost: float = 1.0) -> float:
        ...

    async def charge(self, key: str, rate: Rate, cost: float) -> None:
        ...

    async def block(self, key: str, rate: Rate, until_s: float) -> None:
        ...

    async def aclose(self) -> None:
        ...


GCRA_SLACK_S = 1e-5


def gcra_slack(rate: Rate, cost: float) -> float:
    """A wait up to this counts as 0, so float rounding of the TAT cannot refuse the last
    unit of a burst: 10 µs, or a thousandth of the cost's interval if that is less (so it
    never lets a whole extra unit through)."""
    return min(GCRA_SLACK_S, 1e-3 * cost / rate.per_s)


def gcra(tat: float, now: float, rate: Rate, cost: float) -> tuple[float, float]:
    """One GCRA decision: returns (new TAT, wait). ``wait`` 0 means allowed."""
    if cost > rate.burst:
        return tat, math.inf
    tat = max(tat, now)
    new_tat = tat + cost / rate.per_s
    wait = new_tat - now - rate.burst / rate.per_s
    return (new_tat, 0.0) if wait <= gcra_slack(rate, cost) else (tat, wait)


class MemoryRateLimiter:
    """Per-process limits; exact, no I/O."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._tat: dict[str, float] = {}
        self._clock = clock

    async def acquire(self, key: str, rate: Rate, cost: float = 1.0) -> float:
        now = self._clock()
        tat, wait = gcra(self._tat.get(key, now), now, rate, cost)
        self._tat[key] = tat
        return wait

    async def charge(self, key: str, rate: Rate, cost: float) -> None:
        now = self._clock()
        self._tat[key] = max(self._tat.get(key, now), now) + cost / rate.per_s

    async def block(self, key: str, rate: Rate, until_s: float) -> None:
        now = self._clock()
        blocked = now + until_s + rate.burst / rate.per_s
        self._tat[key] = max(self._tat.get(key, now), blocked)

    async def aclose(self) -> None:
        pass
