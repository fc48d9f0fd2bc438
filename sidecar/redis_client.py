"""The one Redis client behind the shared budget ledger and the shared rate limiter.

:class:`RedisClient` owns a connection pool, registers Lua scripts, and translates every
failure once: a connection error, protocol error or time-out becomes the caller's own
exception class (:class:`~sidecar.money.budgets.LedgerUnavailable` for the ledger,
:class:`~sidecar.limits.gcra.LimiterUnavailable` for the limiter) within about
``timeout_s``, with a message that names the Redis URL with its password replaced by
``***`` (:func:`redact_url`). The pool reconnects on its own once Redis answers again.

What every user of it relies on:

* **One atomic step per decision.** Each check-and-update is one Lua script, run with
  EVALSHA (the script text is sent again only when Redis answers NOSCRIPT, e.g. after a
  restart). Redis runs a script alone, so N sidecars on N hosts never interleave inside one.
* **One clock.** Scripts read Redis's clock (:data:`NOW_US_LUA`, microseconds), never the
  sidecar's, so hosts with skewed clocks share one budget and one limit correctly.
* **Single node only.** Scripts touch several keys that Redis Cluster would hash to
  different slots: a single Redis primary, optionally with replicas. This client does not
  speak the Sentinel protocol: with Sentinel, point the URL at an address that follows the
  primary. Replication is asynchronous, so a failover can lose the last acknowledged writes.
* **A timed-out call may still have been applied** by Redis; each user says why a retry is
  safe for it.

Creating a client does no I/O; the first call connects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

T = TypeVar("T")

NOW_US_LUA = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
"""
"""Lua: ``now_us()``, Redis's clock in microseconds, for scripts to include."""


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


def text(value: Any) -> str:
    """A script's reply value as text (Redis answers bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisClient:
    """One connection pool, its scripts, and the error translation of one user.

    ``error`` is the exception every failure becomes, ``what`` names the user in its
    messages ("budget ledger", "rate limiter"); ``prefix`` starts every key the user
    writes. Safe for concurrent use from one event loop.
    """

    def __init__(self, url: str, *, prefix: str, timeout_s: float,
                 error: type[Exception], what: str) -> None:
        """Raises ``error`` for a URL Redis cannot use (no I/O happens here)."""
        self.prefix = prefix
        self._where = redact_url(url)
        self._secrets = _secrets(url)
        self._timeout_s = timeout_s
        self._error = error
        self._what = what
        try:
            # One quick retry without back-off covers a pooled connection that died while
            # Redis restarted; the overall deadline in call() bounds everything else.
            self._redis: aioredis.Redis = aioredis.Redis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 1),
                decode_responses=False,
            )
        except (ValueError, RedisError) as e:
            raise error(
                f"invalid Redis URL {self._where} for the {what}: {self._scrub(e)}"
            ) from None

    @property
    def redis(self) -> aioredis.Redis:
        """The pool's client, for single commands (run them inside :meth:`call`)."""
        return self._redis

    def script(self, source: str) -> AsyncScript:
        """Register a Lua script (run it inside :meth:`call`)."""
        return self._redis.register_script(source)

    def _scrub(self, e: BaseException) -> str:
        found = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        for secret in self._secrets:
            found = found.replace(secret, "***")
        return found

    async def call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn()`` within ``timeout_s``; any Redis or socket failure raises the
        user's error class, naming ``op`` and the redacted URL."""
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
