"""GCRA rate limits shared by a fleet of sidecars through one Redis.

:class:`RedisRateLimiter` implements :class:`sidecar.limits.gcra.RateLimiter` with exactly
the semantics of that module (one contract test suite runs against every implementation),
through :class:`sidecar.redis_client.RedisClient`: every decision is one Lua script on
Redis's clock (microseconds).

Data layout: ``{prefix}rate:{key}`` (string ``"<µs> <fraction of a µs>"``, expiring once it
is in the past) holds the theoretical arrival time. All the arithmetic is relative to now,
so no precision is lost to the size of the timestamp (a double holds today's time in µs
only to a quarter µs).

A call that timed out may still have been applied: an acquire then took its units (the
caller was told to wait, so at worst a unit is lost), a charge or block applied twice moves
the TAT once more or not at all (block keeps the later time).
"""

from __future__ import annotations

import math

from sidecar.limits.gcra import LimiterUnavailable, Rate, gcra_slack
from sidecar.redis_client import NOW_US_LUA, RedisClient, text

_GCRA_PRELUDE = NOW_US_LUA + """
-- Store TAT = now + ahead, expiring when it is no longer ahead of the clock.
local function store(key, now, ahead)
  local whole = math.floor(ahead)
  local px = math.ceil(ahead / 1000) + 1
  if px < 1 then
    px = 1
  end
  redis.call('SET', key, string.format('%.0f %.17g', now + whole, ahead - whole),
             'PX', string.format('%.0f', px))
end
local now = now_us()
local ahead = 0
local raw = redis.call('GET', KEYS[1])
if raw then
  local whole, frac = string.match(raw, '^(%-?%d+) (%S+)$')
  if whole then
    ahead = math.max(0, (tonumber(whole) - now) + tonumber(frac))
  end
end
"""

# KEYS: tat.  ARGV: increment (cost / rate, µs), tolerance (burst / rate, µs), slack (µs).
# Returns '0' (taken) or the wait in µs as a string. An increment of 0 only reads.
_ACQUIRE = _GCRA_PRELUDE + """
local inc = tonumber(ARGV[1])
local ahead_new = ahead + inc
local wait = ahead_new - tonumber(ARGV[2])
if wait <= tonumber(ARGV[3]) then
  if inc > 0 then
    store(KEYS[1], now, ahead_new)
  end
  return '0'
end
return string.format('%.17g', wait)
"""

# KEYS: tat.  ARGV: increment (µs).
_CHARGE = _GCRA_PRELUDE + """
store(KEYS[1], now, ahead + tonumber(ARGV[1]))
return 1
"""

# KEYS: tat.  ARGV: until (µs from now) + tolerance (µs).
_BLOCK = _GCRA_PRELUDE + """
local blocked = tonumber(ARGV[1])
if blocked > ahead then
  store(KEYS[1], now, blocked)
end
return 1
"""


class RedisRateLimiter:
    """GCRA rate limits in Redis, shared by every sidecar that uses the same URL and prefix.

    Semantics are those of :class:`sidecar.limits.gcra.RateLimiter` (and equal to
    :class:`~sidecar.limits.memory.MemoryRateLimiter` with Redis's clock). A cost above the
    burst returns ``inf`` without asking Redis. Every other call raises
    :class:`~sidecar.limits.gcra.LimiterUnavailable` when Redis cannot be reached within
    ``timeout_s``. Creating the limiter does no I/O.
    """

    def may_have(self, key: str) -> bool:
        """Always True: another sidecar may have written ``key``."""
        return True

    def __init__(self, url: str, *, prefix: str = "sidecar:", timeout_s: float = 0.5) -> None:
        self._client = RedisClient(url, prefix=prefix, timeout_s=timeout_s,
                                   error=LimiterUnavailable, what="rate limiter")
        self._acquire = self._client.script(_ACQUIRE)
        self._charge = self._client.script(_CHARGE)
        self._block = self._client.script(_BLOCK)

    def _key(self, key: str) -> list[str]:
        return [f"{self._client.prefix}rate:{key}"]

    async def acquire(self, key: str, rate: Rate, cost: float = 1.0) -> float:
        """Take ``cost`` units and return 0, or take nothing and return the wait in seconds."""
        if cost > rate.burst:
            return math.inf
        keys = self._key(key)
        args = [cost / rate.per_s * 1e6, rate.burst / rate.per_s * 1e6,
                gcra_slack(rate, cost) * 1e6]
        reply = await self._client.call("acquire",
                                        lambda: self._acquire(keys=keys, args=args))
        wait_us = float(text(reply))
        return 0.0 if wait_us <= 0 else wait_us / 1e6

    async def charge(self, key: str, rate: Rate, cost: float) -> None:
        """Take ``cost`` units unconditionally (the key may go into debt)."""
        keys = self._key(key)
        args = [cost / rate.per_s * 1e6]
        await self._client.call("charge", lambda: self._charge(keys=keys, args=args))

    async def block(self, key: str, rate: Rate, until_s: float) -> None:
        """Make acquires on ``key`` wait until ``until_s`` seconds from now."""
        keys = self._key(key)
        args = [(until_s + rate.burst / rate.per_s) * 1e6]
        await self._client.call("block", lambda: self._block(keys=keys, args=args))

    async def aclose(self) -> None:
        """Close the connection pool (idempotent)."""
        await self._client.aclose()
