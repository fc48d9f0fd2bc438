"""The response cache: answers of repeated deterministic requests, exact or by meaning.

Public face: :func:`directive_of` and :func:`plan` (:mod:`sidecar.cache.policy`: whether a
request uses the cache, under which key; :mod:`sidecar.cache.semantic`: what a question
is, and which kept one means the same), :class:`Entry` (what is kept), :func:`build_store`
and the stores behind :class:`CacheStore` (memory, SQLite, Redis: one contract,
``tests/contract/test_cache_contract.py``). How the gateway uses it is
:mod:`sidecar.gateway.cached`; docs/caching.md says what a user sees.
"""

from __future__ import annotations

from pathlib import Path

from sidecar.cache.entry import Entry
from sidecar.cache.policy import CachePlan, Directive, Result, directive_of, plan
from sidecar.cache.store import CacheStore, CacheUnavailable
from sidecar.cache.store_memory import MemoryCacheStore
from sidecar.config import CacheConfig, StateConfig

__all__ = [
    "CachePlan",
    "CacheStore",
    "CacheUnavailable",
    "Directive",
    "Entry",
    "MemoryCacheStore",
    "Result",
    "build_store",
    "directive_of",
    "plan",
]


def build_store(cache: CacheConfig, state: StateConfig) -> CacheStore:
    """The store ``[cache]`` names (Redis at ``cache.redis_url``, else ``state.redis_url``).
    Raises :class:`CacheUnavailable` when the SQLite file cannot be opened or the Redis
    URL cannot be used."""
    if cache.backend == "sqlite":
        from sidecar.cache.store_sqlite import SQLiteCacheStore

        return SQLiteCacheStore(Path(cache.path).expanduser(), max_bytes=cache.max_bytes,
                                max_entry_bytes=cache.max_entry_bytes)
    if cache.backend == "redis":
        from sidecar.cache.store_redis import RedisCacheStore

        url = cache.redis_url or state.redis_url
        assert url is not None  # the config check requires one
        return RedisCacheStore(url, prefix=cache.redis_prefix, timeout_s=cache.redis_timeout_s,
                               max_bytes=cache.max_bytes,
                               max_entry_bytes=cache.max_entry_bytes)
    return MemoryCacheStore(max_bytes=cache.max_bytes, max_entry_bytes=cache.max_entry_bytes)
