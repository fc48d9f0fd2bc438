"""Rate limits: GCRA (the generic cell rate algorithm), its decision and its contract.

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
* A cost of 0 takes nothing: :meth:`~RateLimiter.acquire` then only reads the wait that a
  block imposes (0 when there is none), so one key can hold a target without limiting it.
* :meth:`~RateLimiter.block` makes every acquire on a key wait until ``until_s`` from now
  (a provider said its limit is reached until then).

Limiters raise :class:`LimiterUnavailable` when shared state cannot be reached.

Implementations: :class:`sidecar.limits.memory.MemoryRateLimiter` (one process) and
:class:`sidecar.limits.redis.RedisRateLimiter` (a fleet, on Redis's clock); one contract
test suite runs against both. :func:`gcra` is the decision itself, pure.
"""

from __future__ import annotations

import math
from typing import Protocol

import msgspec


class LimiterUnavailable(Exception):
    """Shared limiter state cannot be reached; the message says why (never a secret)."""


class Rate(msgspec.Struct, frozen=True):
    per_s: float
    burst: float

    @classmethod
    def per_minute(cls, n: float, burst: float | None = None) -> Rate:
        """``n`` per minute; the burst defaults to a sixth of it (10 s worth), at least 1."""
        return cls(n / 60.0, burst if burst is not None else max(1.0, n / 6.0))


class RateLimiter(Protocol):
    def may_have(self, key: str) -> bool:
        """False only when the limiter knows without I/O that it has no state for ``key``
        (so a cost-0 :meth:`acquire` of it would return 0); True: ask."""
        ...

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
