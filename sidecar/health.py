"""Target health: a circuit breaker per target and a retry budget for the whole gateway.

Both are plain state machines over an injected clock (seconds, monotonic), used from one
event loop thread: no locks, no I/O, no sleeping, so tests drive them with a fake clock.

Circuit states::

    closed --(failures_to_open consecutive failures)--> open
    open --(cooldown elapsed; one caller claims the probe)--> half_open
    half_open --(probe succeeds)--> closed
    half_open --(probe fails)--> open (cooldown starts again)

The breaker counts failures only. A provider that says when to come back (a 429's
Retry-After, ``x-ratelimit-*`` used up) holds its target in the rate limiter instead
(:mod:`sidecar.limits.holds`), so a shared limiter holds it for the whole fleet.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import msgspec

#: Timers may fire a little early (uvloop's resolution is 1 ms): a caller that slept until
#: a circuit's cooldown ends must not find it still open.
_SLACK_S = 0.005


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitView(msgspec.Struct, frozen=True):
    """What ``/readyz`` shows about one target."""

    state: str
    consecutive_failures: int
    retry_in_s: float | None


class Circuit:
    """Breaker for one target. Not thread-safe: owned by the event loop."""

    def __init__(self, failures_to_open: int, cooldown_s: float) -> None:
        self._threshold = failures_to_open
        self._cooldown_s = cooldown_s
        self.state = CircuitState.CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._probing = False

    def available_at(self, now: float) -> float:
        """The earliest time a call may be let through (``now`` or earlier means now)."""
        if self.state is CircuitState.OPEN:
            return self._opened_at + self._cooldown_s
        if self.state is CircuitState.HALF_OPEN and self._probing:
            return now + self._cooldown_s
        return now

    def try_acquire(self, now: float) -> bool:
        """Claim the right to call the target now. A half-open circuit lets one caller in;
        that caller must end with :meth:`success`, :meth:`failure` or :meth:`release`."""
        if self.available_at(now) > now + _SLACK_S:
            return False
        if self.state is CircuitState.OPEN:
            self.state = CircuitState.HALF_OPEN
        if self.state is CircuitState.HALF_OPEN:
            self._probing = True
        return True

    def success(self) -> None:
        self.state = CircuitState.CLOSED
        self.failures = 0
        self._probing = False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state is CircuitState.HALF_OPEN or self.failures >= self._threshold:
            self.state = CircuitState.OPEN
            self._opened_at = now
        self._probing = False

    def release(self) -> None:
        """The call ended without a verdict (cancelled, deadline): free a claimed probe."""
        if self.state is CircuitState.HALF_OPEN:
            self._probing = False

    def view(self, now: float) -> CircuitView:
        at = self.available_at(now)
        retry_in = round(at - now, 3) if at > now else None
        return CircuitView(self.state.value, self.failures, retry_in)


class Health:
    """The circuits of every target, created on first use."""

    def __init__(
        self, failures_to_open: int, cooldown_s: float, clock: Callable[[], float]
    ) -> None:
        self._threshold = failures_to_open
        self._cooldown_s = cooldown_s
        self.clock = clock
        self._circuits: dict[str, Circuit] = {}

    def circuit(self, target: str) -> Circuit:
        c = self._circuits.get(target)
        if c is None:
            c = self._circuits[target] = Circuit(self._threshold, self._cooldown_s)
        return c

    def views(self) -> dict[str, CircuitView]:
        now = self.clock()
        return {k: c.view(now) for k, c in sorted(self._circuits.items())}


class RetryBudget:
    """Caps retries at ``ratio`` of recent requests plus ``minimum`` per window.

    Counts live in one-second buckets over a sliding ``window_s``; a failing provider
    therefore cannot turn N requests into N * (retries + 1) upstream calls.
    """

    def __init__(self, ratio: float, minimum: int, clock: Callable[[], float],
                 window_s: int = 10) -> None:
        self._ratio = ratio
        self._minimum = minimum
        self._clock = clock
        self._window = window_s
        self._requests = [0] * window_s
        self._retries = [0] * window_s
        self._stamp = [-1] * window_s

    def _bucket(self) -> int:
        second = int(self._clock())
        i = second % self._window
        if self._stamp[i] != second:
            self._stamp[i] = second
            self._requests[i] = 0
            self._retries[i] = 0
        return i

    def _totals(self) -> tuple[int, int]:
        oldest = int(self._clock()) - self._window
        req = ret = 0
        for i in range(self._window):
            if self._stamp[i] > oldest:
                req += self._requests[i]
                ret += self._retries[i]
        return req, ret

    def record_request(self) -> None:
        self._requests[self._bucket()] += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        i = self._bucket()
        requests, retries = self._totals()
        if retries >= self._minimum + self._ratio * requests:
            return False
        self._retries[i] += 1
        return True
