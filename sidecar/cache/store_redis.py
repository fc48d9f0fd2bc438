"""The fleet's response cache: one Redis shared by every sidecar that points at it.

:class:`RedisCacheStore` is a :class:`~sidecar.cache.store.CacheStore` through
:class:`sidecar.redis_client.RedisClient` (one pool, errors translated once, the URL's
password never in a message). Single Redis node only, like the ledger and the limiter.

Data layout under ``prefix``: ``v:{key}`` the value (expiring by itself, ``PX``),
``exp`` a sorted set of keys by expiry (Redis's clock, ms), ``size`` a hash of their sizes
and ``total`` their sum. A put is one Lua script: it drops the key's old value and the
index entries of expired ones, then evicts the values soonest to expire until the new one
fits in ``max_bytes``, then stores it. A get is one ``GET``. A put that timed out may still
have been applied, which only means that answer is cached.
"""

from __future__ import annotations

from sidecar.cache.store import CacheUnavailable
from sidecar.redis_client import RedisClient

# KEYS: exp, size, total.  ARGV: prefix, key, value, ttl_ms, max_bytes, keep (1/0).
_PUT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix, member = ARGV[1], ARGV[2]
local function forget(m)
  local size = redis.call('HGET', KEYS[2], m)
  if size then
    redis.call('DECRBY', KEYS[3], size)
    redis.call('HDEL', KEYS[2], m)
  end
  redis.call('ZREM', KEYS[1], m)
  redis.call('DEL', prefix .. 'v:' .. m)
end
forget(member)
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 256)) do
  forget(m)
end
if ARGV[6] ~= '1' then
  return 0
end
local size = string.len(ARGV[3])
local max = tonumber(ARGV[5])
while tonumber(redis.call('GET', KEYS[3]) or '0') + size > max do
  local first = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #first == 0 then
    redis.call('SET', KEYS[3], 0)
    break
  end
  forget(first[1])
end
local ttl = tonumber(ARGV[4])
redis.call('SET', prefix .. 'v:' .. member, ARGV[3], 'PX', ttl)
redis.call('ZADD', KEYS[1], now + ttl, member)
redis.call('HSET', KEYS[2], member, size)
redis.call('INCRBY', KEYS[3], size)
return 1
"""


class RedisCacheStore:
    """See the module docstring. Creating it does no I/O; raises
    :class:`CacheUnavailable` for a URL Redis cannot use."""

    def __init__(self, url: str, *, prefix: str, timeout_s: float, max_bytes: int,
                 max_entry_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._client = RedisClient(url, prefix=prefix, timeout_s=timeout_s,
                                   error=CacheUnavailable, what="response cache")
        self._prefix = prefix
        self._put = self._client.script(_PUT)
        self._index = [f"{prefix}exp", f"{prefix}size", f"{prefix}total"]
        self._redis = self._client.redis

    async def get(self, key: str) -> bytes | None:
        found = await self._client.call("get", lambda: self._redis.get(f"{self._prefix}v:{key}"))
        if found is None:
            return None
        return found if isinstance(found, bytes) else str(found).encode()

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        keep = len(value) <= self.max_entry_bytes
        args: list[bytes | str | int] = [
            self._prefix, key, value if keep else b"", max(1, round(ttl_s * 1000)),
            self.max_bytes, 1 if keep else 0]
        await self._client.call("put", lambda: self._put(keys=self._index, args=args))

    async def size_bytes(self) -> int:
        """The values kept now, together (expired ones not yet dropped included)."""
        found = await self._client.call("size", lambda: self._redis.get(self._index[2]))
        return int(found or 0)

    async def aclose(self) -> None:
        await self._client.aclose()
