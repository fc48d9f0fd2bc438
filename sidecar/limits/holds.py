"""Holds: "the provider told us to wait", kept in the rate limiter.

A provider says so in two ways, and both hold one target (``provider/model``: providers
limit per model) for a number of seconds:

* :attr:`Hold.RETRY_AFTER` -- a failed answer (429, or a 5xx) carried ``Retry-After``;
* :attr:`Hold.EXHAUSTED` -- an answer's ``x-ratelimit-*`` headers said no requests are
  left until the reset.

A hold is a :meth:`~sidecar.limits.gcra.RateLimiter.block` on a key of its own
(``hold:<kind>:<target>``), read with a cost-0 :meth:`~sidecar.limits.gcra.RateLimiter.acquire`
that takes nothing. So the hold lives wherever the limiter does: in the process with the
memory limiter, in Redis (on Redis's clock) with ``[state] backend = "redis"``, where every
sidecar of the fleet skips a target that one of them was told to wait for. A shorter hold
never shortens a longer one.

:class:`Holds` raises :class:`~sidecar.limits.gcra.LimiterUnavailable` like the limiter;
what that means for a request is the caller's decision.
"""

from __future__ import annotations

import enum

from sidecar.limits.gcra import Rate, RateLimiter

#: Timers may fire a little early (uvloop's resolution is 1 ms): a caller that slept for a
#: target's Retry-After must not find it still held.
SLACK_S = 0.005

#: The rate of a hold key. Holds are only blocked and read at cost 0, so the rate never
#: limits anything; its tolerance (1 s) only keeps the key that much past the hold.
_RATE = Rate(per_s=1.0, burst=1.0)


class Hold(enum.Enum):
    """Why a provider told us to wait (each kind is held and read on its own)."""

    RETRY_AFTER = "retry-after"
    EXHAUSTED = "exhausted"


def hold_key(kind: Hold, target: str) -> str:
    """The limiter key of one kind of hold on ``target`` (``provider/model``)."""
    return f"hold:{kind.value}:{target}"


class Holds:
    """Holds on targets, in ``limiter``. Safe for concurrent use on one event loop."""

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def hold(self, kind: Hold, target: str, seconds: float) -> None:
        """Hold ``target`` for ``seconds`` from now (unless it is held longer already)."""
        if seconds > 0:
            await self._limiter.block(hold_key(kind, target), _RATE, seconds)

    async def held_for_s(self, kind: Hold, target: str) -> float | None:
        """Seconds ``target`` is still held for (None: not held, or for less than
        :data:`SLACK_S`). Changes nothing. Read on every attempt: when the limiter knows
        it has nothing for the key (:meth:`~sidecar.limits.gcra.RateLimiter.may_have`, a
        dict lookup in memory) it is not asked."""
        key = hold_key(kind, target)
        if not self._limiter.may_have(key):
            return None
        wait = await self._limiter.acquire(key, _RATE, 0.0)
        return wait if wait > SLACK_S else None
