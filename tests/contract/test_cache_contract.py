"""One contract for every response-cache store (memory, SQLite, Redis), plus each one's own
promises (eviction order, persistence, outages).

The contract is the docstring of :mod:`sidecar.cache.store`. Time is real: the stores read
their own clocks (Redis its server's), so expiry is shown by waiting for it, bounded.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.cache import CacheStore, CacheUnavailable, MemoryCacheStore
from sidecar.cache.store_redis import RedisCacheStore
from sidecar.cache.store_sqlite import SQLiteCacheStore
from tests.support.process import closed_port
from tests.support.redis_server import RedisServer, redis_server_fixture

redis_server = redis_server_fixture(scope="module")
lone_redis = redis_server_fixture(scope="function")

KB = 1024


def make(kind: str, tmp_path: Path, request: pytest.FixtureRequest, *,
         max_bytes: int = 64 * KB, max_entry_bytes: int = 8 * KB) -> CacheStore:
    if kind == "memory":
        return MemoryCacheStore(max_bytes=max_bytes, max_entry_bytes=max_entry_bytes)
    if kind == "sqlite":
        return SQLiteCacheStore(tmp_path / f"{uuid.uuid4().hex}.sqlite3", max_bytes=max_bytes,
                                max_entry_bytes=max_entry_bytes)
    server: RedisServer = request.getfixturevalue("redis_server")
    return RedisCacheStore(server.url, prefix=f"test:{uuid.uuid4().hex}:", timeout_s=1.0,
                           max_bytes=max_bytes, max_entry_bytes=max_entry_bytes)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(kind: str, tmp_path: Path, request: pytest.FixtureRequest
                ) -> AsyncIterator[CacheStore]:
    s = make(kind, tmp_path, request)
    yield s
    await s.aclose()


async def gone(store: CacheStore, key: str, within_s: float = 3.0) -> bool:
    """Whether ``key`` reads as None within ``within_s`` (polled: time itself is tested)."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if await store.get(key) is None:
            return True
        await asyncio.sleep(0.02)
    return False


# --- the contract -------------------------------------------------------------------------


async def test_a_key_never_stored_is_none(store: CacheStore) -> None:
    assert await store.get("nothing") is None
    assert await store.size_bytes() == 0


async def test_put_then_get_and_a_put_replaces(store: CacheStore) -> None:
    await store.put("k", b"first", 60)
    assert await store.get("k") == b"first"
    await store.put("k", b"\x00second\xff", 60)
    assert await store.get("k") == b"\x00second\xff"
    assert await store.size_bytes() == len(b"\x00second\xff")


async def test_a_value_lives_for_its_ttl(store: CacheStore) -> None:
    await store.put("short", b"v", 0.3)
    await store.put("long", b"v", 60)
    assert await store.get("short") == b"v"
    assert await gone(store, "short")
    assert await store.get("long") == b"v"


async def test_a_value_over_max_entry_bytes_is_not_kept(store: CacheStore) -> None:
    await store.put("k", b"small", 60)
    await store.put("k", b"x" * (8 * KB + 1), 60)  # replaces: the old value is gone too
    assert await store.get("k") is None
    await store.put("edge", b"x" * (8 * KB), 60)
    assert await store.get("edge") == b"x" * (8 * KB)


async def test_the_total_stays_within_max_bytes(store: CacheStore) -> None:
    for i in range(40):  # 40 x 4 KB into 64 KB
        await store.put(f"k{i}", bytes([i]) * 4 * KB, 60)
        assert await store.size_bytes() <= 64 * KB
    assert await store.get("k39") == bytes([39]) * 4 * KB
    assert await store.get("k0") is None
    kept = [i for i in range(40) if await store.get(f"k{i}") is not None]
    assert 12 <= len(kept) <= 16


async def test_concurrent_puts_and_gets(store: CacheStore) -> None:
    async def one(i: int) -> bytes | None:
        await store.put(f"c{i}", str(i).encode() * 10, 60)
        return await store.get(f"c{i}")

    found = await asyncio.gather(*(one(i) for i in range(50)))
    assert found == [str(i).encode() * 10 for i in range(50)]


async def test_aclose_is_idempotent(kind: str, tmp_path: Path,
                                    request: pytest.FixtureRequest) -> None:
    s = make(kind, tmp_path, request)
    await s.put("k", b"v", 60)
    await s.aclose()
    await s.aclose()


# --- eviction order -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_the_least_recently_used_goes_first(kind: str, tmp_path: Path,
                                                  request: pytest.FixtureRequest) -> None:
    s = make(kind, tmp_path, request, max_bytes=4 * KB, max_entry_bytes=KB)
    for k in "abcd":
        await s.put(k, b"x" * KB, 60)
    assert await s.get("a") is not None  # a is now the most recently used
    await s.put("e", b"x" * KB, 60)
    assert await s.get("b") is None
    assert all([await s.get(k) is not None for k in "acde"])
    await s.aclose()


async def test_redis_evicts_the_soonest_to_expire(request: pytest.FixtureRequest,
                                                  tmp_path: Path) -> None:
    s = make("redis", tmp_path, request, max_bytes=4 * KB, max_entry_bytes=KB)
    for k, ttl in zip("abcd", (60, 5, 60, 60), strict=True):
        await s.put(k, b"x" * KB, ttl)
    await s.put("e", b"x" * KB, 60)
    assert await s.get("b") is None
    assert all([await s.get(k) is not None for k in "acde"])
    assert await s.size_bytes() == 4 * KB
    await s.aclose()


# --- SQLite ---------------------------------------------------------------------------------


async def test_sqlite_keeps_answers_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "responses.sqlite3"
    first = SQLiteCacheStore(path, max_bytes=64 * KB, max_entry_bytes=KB)
    await first.put("k", b"kept", 60)
    await first.aclose()
    again = SQLiteCacheStore(path, max_bytes=64 * KB, max_entry_bytes=KB)
    assert await again.get("k") == b"kept"
    assert await again.size_bytes() == 4
    await again.aclose()


async def test_two_processes_sharing_the_file_agree_on_the_total(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    one = SQLiteCacheStore(path, max_bytes=4 * KB, max_entry_bytes=KB)
    two = SQLiteCacheStore(path, max_bytes=4 * KB, max_entry_bytes=KB)
    for i in range(6):
        await (one if i % 2 else two).put(f"k{i}", b"x" * KB, 60)
    assert await one.size_bytes() == await two.size_bytes() <= 4 * KB
    assert await one.get("k5") is not None and await two.get("k0") is None
    await one.aclose()
    await two.aclose()


def test_a_file_that_is_not_a_cache_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "not-a-cache.sqlite3"
    path.write_bytes(b"this is not an SQLite database, " * 100)
    with pytest.raises(CacheUnavailable) as e:
        SQLiteCacheStore(path, max_bytes=KB, max_entry_bytes=KB)
    assert str(path) in str(e.value)


def test_a_directory_that_cannot_be_made_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    with pytest.raises(CacheUnavailable) as e:
        SQLiteCacheStore(blocker / "cache.sqlite3", max_bytes=KB, max_entry_bytes=KB)
    assert "cache.sqlite3" in str(e.value)


# --- Redis ----------------------------------------------------------------------------------


async def test_redis_unreachable_is_unavailable_quickly_and_without_the_password() -> None:
    s = RedisCacheStore(f"redis://:hunter2-secret@127.0.0.1:{closed_port()}/0", prefix="t:",
                        timeout_s=0.3, max_bytes=KB, max_entry_bytes=KB)
    start = time.monotonic()
    for op in (s.get("k"), s.put("k", b"v", 60)):
        with pytest.raises(CacheUnavailable) as e:
            await op
        assert "hunter2-secret" not in str(e.value) and "***" in str(e.value)
    assert time.monotonic() - start < 2.0
    await s.aclose()


async def test_redis_comes_back_after_a_restart(lone_redis: RedisServer) -> None:
    s = RedisCacheStore(lone_redis.url, prefix="t:", timeout_s=0.5, max_bytes=64 * KB,
                        max_entry_bytes=KB)
    await s.put("k", b"v", 60)
    lone_redis.stop()
    with pytest.raises(CacheUnavailable):
        await s.get("k")
    lone_redis.restart()  # same port, no data, no scripts
    await s.put("k2", b"w", 60)
    assert await s.get("k2") == b"w"
    await s.aclose()


async def test_two_sidecars_share_one_redis_cache(redis_server: RedisServer) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    one, two = (RedisCacheStore(redis_server.url, prefix=prefix, timeout_s=1.0,
                                max_bytes=64 * KB, max_entry_bytes=KB) for _ in range(2))
    await one.put("k", b"from one", 60)
    assert await two.get("k") == b"from one"
    await one.aclose()
    await two.aclose()
