"""The spend ledger shared by a fleet of sidecars through one Redis.

:class:`RedisBudgetStore` implements :class:`sidecar.money.budgets.BudgetStore` with exactly
the semantics in that module's docstring (one contract test suite runs against every
implementation), through :class:`sidecar.redis_client.RedisClient` (one Lua script per
check-and-update, on Redis's clock; single node only; failures as
:class:`~sidecar.money.budgets.LedgerUnavailable`). What this ledger adds:

* **Integers for money.** Amounts are integer micro-dollars. Lua numbers are doubles, exact
  up to 2**53 µ$ (about 9 billion dollars), and the scripts format every number they write
  or return as a string, because Redis truncates a Lua number in a reply to an integer.
* **The same reservation rule** as :func:`sidecar.money.budgets.fit`, inside the reserve
  script.

Data layout, with ``{b}`` standing for ``{budget}:{subject}:{window}`` (``%`` and ``:``
percent-escaped inside each part, so two different budget keys never share a name):

* ``{prefix}spend:{b}`` (string) -- integer µ$ spent; never expires, like the SQLite ledger;
* ``{prefix}resv:{b}`` (sorted set) -- reservation id -> expiry (Redis µs);
* ``{prefix}resv-amt:{b}`` (hash) -- reservation id -> amount reserved;
* ``{prefix}reserved:{b}`` (string) -- the sum of the live amounts, so a reserve costs O(1),
  not O(concurrent requests). These three keys carry no Redis TTL: they are deleted when
  their last reservation goes, and an expired reservation is never just dropped;
* ``{prefix}rid:{rid}`` (hash, TTL = the reservation's) -- amount, expiry and budget keys of
  one reservation, so any sidecar can settle or release it by id;
* ``{prefix}settled:{rid}`` (string, TTL one day) -- the marker that makes settle
  idempotent: a replayed settle, or a reserve reusing a settled id, changes nothing.

The keys of one request (several budgets, the reservation record) would hash to different
Redis Cluster slots, and settle/release derive key names from the reservation record inside
the script, so every key must live on one node.

**A crashed sidecar.** Its reservations stay in Redis and keep counting as reserved (the
budget's room is the same as if they were spent) until they expire, ``ttl_s`` after they
were made (the gateway's longest request deadline plus a minute). An expired reservation is
then **spent at its reserved amount**, the worst case of a call that may have been billed:
every script that reads a budget key (reserve, totals, and settle of an expired id) first
moves that key's expired entries from reserved to spent, atomically, on Redis's clock. So
whichever sidecar of the fleet looks first, the result is the same, and a key nobody reads
keeps them as reservations until someone does (nothing is lost meanwhile). A settle or
release that arrives after the expiry changes nothing. The same happens to a reservation
whose settle or release failed because Redis was unreachable: charged at its worst case,
never lost.

**A call that timed out** may still have been applied by Redis: a reserve then expires (and
is spent at its amount, see above), and settle/release are idempotent, so retrying them is
safe.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from sidecar.money.budgets import (
    SETTLED_TTL_S,
    BudgetKey,
    LedgerUnavailable,
    Reserved,
    Shortfall,
    Totals,
    replayed,
)
from sidecar.redis_client import NOW_US_LUA, RedisClient, text

_PRELUDE = NOW_US_LUA + """

-- An integer as a string: Lua's own number formatting loses digits past 14.
local function int(x)
  return string.format('%.0f', x)
end

-- Spend the expired reservations of one budget key at their amounts: their sidecar died
-- (or lost Redis) before it settled or released them, and the call may have been billed.
-- z: rid -> expiry; h: rid -> amount; r: sum of the amounts in h; s: the key's spend.
local function purge(z, h, r, s, now)
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', int(now))
  if #gone > 0 then
    local sum = 0
    for _, rid in ipairs(gone) do
      sum = sum + (tonumber(redis.call('HGET', h, rid)) or 0)
      redis.call('HDEL', h, rid)
    end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', int(now))
    redis.call('DECRBY', r, int(sum))
    redis.call('INCRBY', s, int(sum))
  end
  -- No live reservation left: the sum is zero by definition (this also heals any drift).
  if redis.call('ZCARD', z) == 0 then
    redis.call('DEL', h, r)
  end
end

-- Remove reservation rid from one budget key.
local function drop(z, h, r, rid)
  local amount = redis.call('HGET', h, rid)
  if amount then
    redis.call('HDEL', h, rid)
    redis.call('DECRBY', r, amount)
  end
  redis.call('ZREM', z, rid)
  if redis.call('ZCARD', z) == 0 then
    redis.call('DEL', h, r)
  end
end
"""

# KEYS: rid record, settled marker, then 4 per budget key: spend, resv, resv-amt, reserved.
# ARGV: rid, want_max, want_min, ttl_us, ttl_ms, budget keys (JSON list), limit per key.
# Returns {'ok', amount} | {'noroom', index (1-based), room} | {'settled'}.
_RESERVE = _PRELUDE + """
local rid = ARGV[1]
local want_max, want_min = tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl_us, ttl_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local n = (#KEYS - 2) / 4
local now = now_us()
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {'settled'}
end
for i = 0, n - 1 do
  local b = 3 + 4 * i
  purge(KEYS[b + 1], KEYS[b + 2], KEYS[b + 3], KEYS[b], now)
end
local rec = redis.call('HMGET', KEYS[1], 'amount', 'exp')
if rec[1] and tonumber(rec[2]) > now then
  return {'ok', rec[1]}
end
local amount = want_max
local need = math.max(want_min, 1)
for i = 0, n - 1 do
  local b = 3 + 4 * i
  local spent = tonumber(redis.call('GET', KEYS[b])) or 0
  local reserved = tonumber(redis.call('GET', KEYS[b + 3])) or 0
  local room = tonumber(ARGV[7 + i]) - spent - reserved
  if room < need then
    return {'noroom', i + 1, int(math.max(0, room))}
  end
  if room < amount then
    amount = room
  end
end
if amount < want_min then
  amount = want_min
end
local exp = now + ttl_us
for i = 0, n - 1 do
  local b = 3 + 4 * i
  local z, h, r = KEYS[b + 1], KEYS[b + 2], KEYS[b + 3]
  redis.call('ZADD', z, int(exp), rid)
  redis.call('HSET', h, rid, int(amount))
  redis.call('INCRBY', r, int(amount))
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'amount', int(amount), 'exp', int(exp), 'keys', ARGV[6])
redis.call('PEXPIRE', KEYS[1], int(ttl_ms))
return {'ok', int(amount)}
"""

# KEYS: rid record, settled marker.  ARGV: rid, actual, prefix, settled ttl (s).
# Returns 1 when this call settled the reservation, 0 when it changed nothing.
_SETTLE = _PRELUDE + """
local rid, actual, prefix = ARGV[1], ARGV[2], ARGV[3]
local now = now_us()
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
local rec = redis.call('HMGET', KEYS[1], 'exp', 'keys')
if not rec[1] then
  return 0
end
redis.call('DEL', KEYS[1])
local live = tonumber(rec[1]) > now
for _, b in ipairs(cjson.decode(rec[2])) do
  local z, h, r = prefix .. 'resv:' .. b, prefix .. 'resv-amt:' .. b, prefix .. 'reserved:' .. b
  if live then
    drop(z, h, r, rid)
    redis.call('INCRBY', prefix .. 'spend:' .. b, actual)
  else  -- expired: spent at its amount, as any reader of the key would find it
    purge(z, h, r, prefix .. 'spend:' .. b, now)
  end
end
if not live then
  return 0
end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[4])
return 1
"""

# KEYS: rid record.  ARGV: rid, prefix.
_RELEASE = _PRELUDE + """
local rid, prefix = ARGV[1], ARGV[2]
local rec = redis.call('HMGET', KEYS[1], 'exp', 'keys')
if not rec[1] then
  return 0
end
redis.call('DEL', KEYS[1])
local live = tonumber(rec[1]) > now_us()
for _, b in ipairs(cjson.decode(rec[2])) do
  local z, h, r = prefix .. 'resv:' .. b, prefix .. 'resv-amt:' .. b, prefix .. 'reserved:' .. b
  if live then
    drop(z, h, r, rid)
  else  -- expired: spent at its amount, as for settle
    purge(z, h, r, prefix .. 'spend:' .. b, now_us())
  end
end
return live and 1 or 0
"""

# KEYS: 4 per budget key (as for reserve).  Returns spent, reserved per key, as strings.
_TOTALS = _PRELUDE + """
local now = now_us()
local out = {}
for i = 0, #KEYS / 4 - 1 do
  local b = 1 + 4 * i
  purge(KEYS[b + 1], KEYS[b + 2], KEYS[b + 3], KEYS[b], now)
  out[#out + 1] = redis.call('GET', KEYS[b]) or '0'
  out[#out + 1] = redis.call('GET', KEYS[b + 3]) or '0'
end
return out
"""


def _esc(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A")


def _base(key: BudgetKey) -> str:
    return f"{_esc(key.budget)}:{_esc(key.subject)}:{_esc(key.window)}"


class RedisBudgetStore:
    """The spend ledger in Redis, shared by every sidecar that uses the same URL and prefix.

    Semantics are those of :class:`sidecar.money.budgets.BudgetStore` (see that module); the
    layout, clock and failure behaviour are described in this module's docstring. Creating
    the store does no I/O; the first call connects. Every method raises
    :class:`~sidecar.money.budgets.LedgerUnavailable` when Redis cannot be reached within
    ``timeout_s``.
    """

    def __init__(self, url: str, *, prefix: str = "sidecar:", timeout_s: float = 0.5) -> None:
        self._client = RedisClient(url, prefix=prefix, timeout_s=timeout_s,
                                   error=LedgerUnavailable, what="budget ledger")
        self._prefix = prefix
        self._reserve = self._client.script(_RESERVE)
        self._settle = self._client.script(_SETTLE)
        self._release = self._client.script(_RELEASE)
        self._totals = self._client.script(_TOTALS)

    def _key_names(self, key: BudgetKey) -> list[str]:
        b, p = _base(key), self._prefix
        return [f"{p}spend:{b}", f"{p}resv:{b}", f"{p}resv-amt:{b}", f"{p}reserved:{b}"]

    def _rid_names(self, rid: str) -> list[str]:
        return [f"{self._prefix}rid:{rid}", f"{self._prefix}settled:{rid}"]

    async def reserve(self, rid: str, limits: Sequence[tuple[BudgetKey, int]],
                      want_max: int, want_min: int, ttl_s: float) -> Reserved | Shortfall:
        """Reserve on every ``(key, limit)`` at once, in one script; see the contract."""
        # A key named twice is reserved once, against the smaller of its limits.
        merged: dict[BudgetKey, int] = {}
        for key, limit in limits:
            merged[key] = min(limit, merged.get(key, limit))
        order = list(merged)
        keys = self._rid_names(rid)
        for key in order:
            keys += self._key_names(key)
        ttl_us = max(1, round(ttl_s * 1e6))
        args: list[str | int] = [
            rid, int(want_max), int(want_min), ttl_us, max(1, math.ceil(ttl_us / 1000)),
            json.dumps([_base(k) for k in order]), *(int(merged[k]) for k in order),
        ]
        reply = await self._client.call("reserve", lambda: self._reserve(keys=keys, args=args))
        status = text(reply[0])
        if status == "ok":
            return Reserved(int(text(reply[1])))
        if status == "noroom":
            return Shortfall(order[int(reply[1]) - 1], int(text(reply[2])))
        return replayed(limits)  # a settled id

    async def settle(self, rid: str, actual: int) -> None:
        """Add ``actual`` µ$ to every key of live reservation ``rid``, once.

        An unknown, released, expired or already settled id changes nothing.
        """
        keys = self._rid_names(rid)
        args: list[str | int] = [rid, int(actual), self._prefix, SETTLED_TTL_S]
        await self._client.call("settle", lambda: self._settle(keys=keys, args=args))

    async def release(self, rid: str) -> None:
        """Drop reservation ``rid`` without spending (unknown ids are ignored)."""
        keys = [self._rid_names(rid)[0]]
        args = [rid, self._prefix]
        await self._client.call("release", lambda: self._release(keys=keys, args=args))

    async def totals(self, keys: Sequence[BudgetKey]) -> dict[BudgetKey, Totals]:
        """Spent and live reserved µ$ per key (zero for keys never used)."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        names = [n for k in unique for n in self._key_names(k)]
        reply = await self._client.call("totals", lambda: self._totals(keys=names))
        return {
            k: Totals(int(text(reply[2 * i])), int(text(reply[2 * i + 1])))
            for i, k in enumerate(unique)
        }

    async def aclose(self) -> None:
        """Close the connection pool (idempotent)."""
        await self._client.aclose()
