"""The in-process rate limiter: GCRA over a dict (the contract: :mod:`sidecar.limits.gcra`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from sidecar.limits.gcra import Rate, gcra


class MemoryRateLimiter:
    """Per-process limits; exact, no I/O. ``clock`` is monotonic seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._tat: dict[str, float] = {}
        self._clock = clock

    def may_have(self, key: str) -> bool:
        return key in self._tat

    async def acquire(self, key: str, rate: Rate, cost: float = 1.0) -> float:
        now = self._clock()
        tat, wait = gcra(self._tat.get(key, now), now, rate, cost)
        if cost > 0:  # a cost of 0 only reads (and adds no key)
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
