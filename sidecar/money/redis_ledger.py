"""Budgets and rate limits shared by a fleet of sidecars through one Redis.

:class:`RedisBudgetStore` implements :class:`sidecar.money.budgets.BudgetStore` and
:class:`RedisRateLimiter` implements :class:`sidecar.limits.gcra.RateLimiter`, with exactly the
semantics in those modules' docstrings (one contract test suite runs against every
implementation). What Redis adds:

* **One atomic step per decision.** Every check-and-update (reserve, settle, release, the
  lazy clean-up behind totals, and each GCRA decision) is one Lua script, run with EVALSHA
  (the script text is sent again only when Redis answers NOSCRIPT, e.g. after a restart).
  Redis runs a script alone, so N sidecars on N hosts can never interleave inside one.
* **One clock.** Reservation expiry and GCRA use Redis's clock (``TIME`` inside the script,
  in microseconds), never the sidecar's, so hosts with skewed clocks share one budget and
  one limit correctly.
* **Integers for money.** Amounts are integer micro-dollars. Lua numbers are doubles, exact
  up to 2**53 µ$ (about 9 billion dollars), and the scripts format every number they write
  or return as a string, because Redis truncates a Lua number in a reply to an integer.

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
  idempotent: a replayed settle, or a reserve reusing a settled id, changes nothing;
* ``{prefix}rate:{key}`` (string ``"<µs> <fraction of a µs>"``, expiring once it is in the
  past) -- the GCRA theoretical arrival time, in Redis's clock.

**Single node only.** The keys of one request (several budgets, the reservation record)
hash to different Redis Cluster slots, and settle/release derive key names from the
reservation record inside the script, so every key must live on one node: a single Redis
primary, optionally with replicas. Redis Cluster is not supported. This client does not
speak the Sentinel protocol: with Sentinel, point the URL at an address that follows the
primary (a proxy, or a name that failover updates). Replication is asynchronous, so a
failover can lose the last writes the old primary acknowledged (spend may be under-counted
by the requests settled in that moment).

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

**Failures.** Any connection error, protocol error or time-out becomes
:class:`~sidecar.money.budgets.LedgerUnavailable` / :class:`~sidecar.limits.gcra.LimiterUnavailable`
within about ``timeout_s``; the message names the Redis URL with its password replaced by
``***``. The connection pool reconnects on its own once Redis answers again. A call that
timed out may still have been applied by Redis: a reserve then expires (and is spent at its
amount, see above), and settle/release are idempotent, so retrying them is safe.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from sidecar.limits.gcra import LimiterUnavailable, Rate, gcra_slack
from sidecar.money.budgets import (
    SETTLED_TTL_S,
    BudgetKey,
    LedgerUnavailable,
    NoRoom,
    Reserved,
    Totals,
    replayed,
)

T = TypeVar("T")

# --- Lua ----------------------------------------------------------------------------------

_NOW_US = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
"""

_PRELUDE = _NOW_US + """

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

# GCRA in Redis µs. The TAT is stored as "<integer µs> <fraction of a µs>" and all the
# arithmetic is relative to now, so no precision is lost to the size of the timestamp (a
# double holds today's time in µs only to a quarter µs).
_GCRA_PRELUDE = _NOW_US + """
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
# Returns '0' (taken) or the wait in µs as a string.
_ACQUIRE = _GCRA_PRELUDE + """
local ahead_new = ahead + tonumber(ARGV[1])
local wait = ahead_new - tonumber(ARGV[2])
if wait <= tonumber(ARGV[3]) then
  store(KEYS[1], now, ahead_new)
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


# --- helpers ------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """``url`` with any password (in the user info or a ``password=`` query) as ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable Redis URL>"
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if colon else f"***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if "pass" in k.lower() else v) for k, v in pairs], safe="*"
        )
    # Not urlunsplit: it turns "unix:///path" into "unix:/path".
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def _secrets(url: str) -> list[str]:
    """The password spellings that must never appear in a message."""
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
        found += [v for k, v in parse_qsl(parts.query) if "pass" in k.lower()]
    except ValueError:
        return []
    return [s for f in found if f for s in {f, unquote(f)}]


def _esc(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A")


def _base(key: BudgetKey) -> str:
    return f"{_esc(key.budget)}:{_esc(key.subject)}:{_esc(key.window)}"


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _RedisClient:
    """One connection pool, its scripts, and the error translation shared by both classes."""

    _error: type[Exception] = Exception
    _what = "state"

    def __init__(self, url: str, *, prefix: str, timeout_s: float) -> None:
        self._where = redact_url(url)
        self._secrets = _secrets(url)
        self._prefix = prefix
        self._timeout_s = timeout_s
        try:
            # One quick retry without back-off covers a pooled connection that died while
            # Redis restarted; the overall deadline in _call bounds everything else.
            self._redis: aioredis.Redis = aioredis.Redis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 1),
                decode_responses=False,
            )
        except (ValueError, RedisError) as e:
            raise self._error(
                f"invalid Redis URL {self._where} for the {self._what}: {self._scrub(e)}"
            ) from None

    def _scrub(self, e: BaseException) -> str:
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await fn()
        except TimeoutError:
            raise self._error(
                f"Redis {self._where} did not answer within {self._timeout_s:g} s "
                f"({self._what} {op})"
            ) from None
        except (RedisError, OSError) as e:
            raise self._error(
                f"Redis {self._where} unavailable ({self._what} {op}): {self._scrub(e)}"
            ) from None

    async def aclose(self) -> None:
        """Close the connection pool (idempotent)."""
        await self._redis.aclose()


# --- budgets ------------------------------------------------------------------------------


class RedisBudgetStore(_RedisClient):
    """The spend ledger in Redis, shared by every sidecar that uses the same URL and prefix.

    Semantics are those of :class:`sidecar.money.budgets.BudgetStore` (see that module); the
    layout, clock and failure behaviour are described in this module's docstring. Creating
    the store does no I/O; the first call connects. Every method raises
    :class:`~sidecar.money.budgets.LedgerUnavailable` when Redis cannot be reached within
    ``timeout_s``.
    """

    _error = LedgerUnavailable
    _what = "budget ledger"

    def __init__(self, url: str, *, prefix: str = "sidecar:", timeout_s: float = 0.5) -> None:
        super().__init__(url, prefix=prefix, timeout_s=timeout_s)
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)
        self._release = self._redis.register_script(_RELEASE)
        self._totals = self._redis.register_script(_TOTALS)

    def _key_names(self, key: BudgetKey) -> list[str]:
        b, p = _base(key), self._prefix
        return [f"{p}spend:{b}", f"{p}resv:{b}", f"{p}resv-amt:{b}", f"{p}reserved:{b}"]

    def _rid_names(self, rid: str) -> list[str]:
        return [f"{self._prefix}rid:{rid}", f"{self._prefix}settled:{rid}"]

    async def reserve(self, rid: str, limits: Sequence[tuple[BudgetKey, int]],
                      want_max: int, want_min: int, ttl_s: float) -> Reserved | NoRoom:
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
        reply = await self._call("reserve", lambda: self._reserve(keys=keys, args=args))
        status = _s(reply[0])
        if status == "ok":
            return Reserved(int(_s(reply[1])))
        if status == "noroom":
            return NoRoom(order[int(reply[1]) - 1], int(_s(reply[2])))
        return replayed(limits)  # a settled id

    async def settle(self, rid: str, actual: int) -> None:
        """Add ``actual`` µ$ to every key of live reservation ``rid``, once.

        An unknown, released, expired or already settled id changes nothing.
        """
        keys = self._rid_names(rid)
        args: list[str | int] = [rid, int(actual), self._prefix, SETTLED_TTL_S]
        await self._call("settle", lambda: self._settle(keys=keys, args=args))

    async def release(self, rid: str) -> None:
        """Drop reservation ``rid`` without spending (unknown ids are ignored)."""
        keys = [self._rid_names(rid)[0]]
        args = [rid, self._prefix]
        await self._call("release", lambda: self._release(keys=keys, args=args))

    async def totals(self, keys: Sequence[BudgetKey]) -> dict[BudgetKey, Totals]:
        """Spent and live reserved µ$ per key (zero for keys never used)."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        names = [n for k in unique for n in self._key_names(k)]
        reply = await self._call("totals", lambda: self._totals(keys=names))
        return {
            k: Totals(int(_s(reply[2 * i])), int(_s(reply[2 * i + 1])))
            for i, k in enumerate(unique)
        }


# --- rate limits --------------------------------------------------------------------------


class RedisRateLimiter(_RedisClient):
    """GCRA rate limits in Redis, shared by every sidecar that uses the same URL and prefix.

    Semantics are those of :class:`sidecar.limits.gcra.RateLimiter` (and equal to
    :class:`~sidecar.limits.gcra.MemoryRateLimiter` with Redis's clock): one TAT per key at
    ``{prefix}rate:{key}``, expiring once it is in the past. A cost above the burst returns
    ``inf`` without asking Redis. Every other call raises
    :class:`~sidecar.limits.gcra.LimiterUnavailable` when Redis cannot be reached within
    ``timeout_s``.
    """

    _error = LimiterUnavailable
    _what = "rate limiter"

    def __init__(self, url: str, *, prefix: str = "sidecar:", timeout_s: float = 0.5) -> None:
        super().__init__(url, prefix=prefix, timeout_s=timeout_s)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._charge = self._redis.register_script(_CHARGE)
        self._block = self._redis.register_script(_BLOCK)

    def _key(self, key: str) -> list[str]:
        return [f"{self._prefix}rate:{key}"]

    async def acquire(self, key: str, rate: Rate, cost: float = 1.0) -> float:
        """Take ``cost`` units and return 0, or take nothing and return the wait in seconds."""
        if cost > rate.burst:
            return math.inf
        keys = self._key(key)
        args = [cost / rate.per_s * 1e6, rate.burst / rate.per_s * 1e6,
                gcra_slack(rate, cost) * 1e6]
        reply = await self._call("acquire", lambda: self._acquire(keys=keys, args=args))
        wait_us = float(_s(reply))
        return 0.0 if wait_us <= 0 else wait_us / 1e6

    async def charge(self, key: str, rate: Rate, cost: float) -> None:
        """Take ``cost`` units unconditionally (the key may go into debt)."""
        keys = self._key(key)
        args = [cost / rate.per_s * 1e6]
        await self._call("charge", lambda: self._charge(keys=keys, args=args))

    async def block(self, key: str, rate: Rate, until_s: float) -> None:
        """Make acquires on ``key`` wait until ``until_s`` seconds from now."""
        keys = self._key(key)
        args = [(until_s + rate.burst / rate.per_s) * 1e6]
        await self._call("block", lambda: self._block(keys=keys, args=args))
