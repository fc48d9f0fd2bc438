"""One contract for every rate limiter (memory, Redis), plus the Redis one's own promises.

The contract is the docstring of :mod:`sidecar.limits.gcra`. Time is real here: the memory
limiter uses ``time.monotonic`` and the Redis one Redis's clock (the same host's, so the
waits measured here agree with it to well within the tolerances).
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from sidecar.limits import (
    Hold,
    Holds,
    LimiterUnavailable,
    MemoryRateLimiter,
    Rate,
    RateLimiter,
    gcra,
)
from sidecar.limits.redis import RedisRateLimiter
from tests.support.process import closed_port
from tests.support.redis_server import RedisServer, redis_server_fixture

redis_server = redis_server_fixture(scope="module")
lone_redis = redis_server_fixture(scope="function")

TOLERANCE_S = 0.005


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    lim: RateLimiter
    if request.param == "memory":
        lim = MemoryRateLimiter()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        lim = RedisRateLimiter(server.url, prefix=f"test:{uuid.uuid4().hex}:")
    yield lim
    await lim.aclose()


# --- the contract -------------------------------------------------------------------------


async def test_burst_is_admitted_then_the_wait_follows_gcra(limiter: RateLimiter) -> None:
    rate = Rate(per_s=1.0, burst=5.0)
    start = time.monotonic()
    assert [await limiter.acquire("k", rate) for _ in range(5)] == [0.0] * 5
    wait = await limiter.acquire("k", rate)
    elapsed = time.monotonic() - start
    # The 6th unit is due 1/rate after the first one was taken.
    assert 1.0 - elapsed - TOLERANCE_S <= wait <= 1.0 + 1e-6
    # A refused acquire takes nothing: asking again gives the same answer.
    assert abs(await limiter.acquire("k", rate) - wait) < elapsed + TOLERANCE_S
    # A bigger cost waits proportionally longer.
    assert await limiter.acquire("k", rate, cost=3.0) == pytest.approx(3.0, abs=0.02)


async def test_the_wait_is_accurate(limiter: RateLimiter) -> None:
    rate = Rate(per_s=20.0, burst=2.0)
    assert await limiter.acquire("k", rate) == 0.0
    assert await limiter.acquire("k", rate) == 0.0
    wait = await limiter.acquire("k", rate)
    assert 0.05 - 0.02 < wait <= 0.05 + 1e-6
    await asyncio.sleep(wait + 0.002)
    assert await limiter.acquire("k", rate) == 0.0
    assert await limiter.acquire("k", rate) > 0.0


async def test_admitted_rate_under_load_matches_the_limit(limiter: RateLimiter) -> None:
    """Callers at ~8x the limit for 2 s get burst + rate * duration units, within 1."""
    rate = Rate(per_s=50.0, burst=5.0)
    admitted = 0
    start = time.monotonic()
    last = start
    while last - start < 2.0:
        if await limiter.acquire("k", rate) == 0.0:
            admitted += 1
        last = time.monotonic()
        await asyncio.sleep(0.0025)
    expected = rate.burst + rate.per_s * (last - start)
    assert expected - 1.5 <= admitted <= expected + 1, (admitted, expected)


async def test_a_cost_above_the_burst_never_fits(limiter: RateLimiter) -> None:
    rate = Rate(per_s=100.0, burst=10.0)
    assert await limiter.acquire("k", rate, cost=10.5) == math.inf
    assert await limiter.acquire("k", rate, cost=10.0) == 0.0  # nothing was taken


async def test_charge_creates_debt(limiter: RateLimiter) -> None:
    rate = Rate(per_s=10.0, burst=2.0)
    start = time.monotonic()
    await limiter.charge("k", rate, 5.0)  # 5 units: 3 more than the burst allows
    wait = await limiter.acquire("k", rate)
    elapsed = time.monotonic() - start
    # TAT is 0.5 s ahead; one more unit needs it within 0.2 s (burst / rate) after +0.1 s.
    assert 0.4 - elapsed - TOLERANCE_S <= wait <= 0.4 + 1e-6
    await limiter.charge("k", rate, 1.0)
    assert await limiter.acquire("k", rate) == pytest.approx(0.5, abs=elapsed + 0.02)


async def test_may_have_is_false_only_for_keys_without_state(limiter: RateLimiter) -> None:
    rate = Rate(per_s=10.0, burst=2.0)
    if not limiter.may_have("fresh"):  # a cost-0 read of it must then be 0
        assert await limiter.acquire("fresh", rate, 0.0) == 0.0
    await limiter.block("held", rate, 0.5)
    assert limiter.may_have("held")
    assert await limiter.acquire("held", rate, 0.0) > 0


async def test_block_makes_every_acquire_wait(limiter: RateLimiter) -> None:
    rate = Rate(per_s=10.0, burst=2.0)
    start = time.monotonic()
    await limiter.block("k", rate, 0.5)
    wait = await limiter.acquire("k", rate)
    elapsed = time.monotonic() - start
    # Blocked until 0.5 s from now; then the unit itself takes 1 / rate.
    assert 0.6 - elapsed - TOLERANCE_S <= wait <= 0.6 + 1e-6
    # A shorter block does not shorten a longer one.
    await limiter.block("k", rate, 0.1)
    assert await limiter.acquire("k", rate) == pytest.approx(0.6, abs=elapsed + 0.02)
    assert await limiter.acquire("other", rate) == 0.0


async def test_block_in_the_past_admits_the_burst(limiter: RateLimiter) -> None:
    rate = Rate(per_s=10.0, burst=2.0)
    await limiter.block("k", rate, -1.0)
    assert [await limiter.acquire("k", rate) for _ in range(2)] == [0.0, 0.0]


async def test_a_cost_of_zero_only_reads_the_wait(limiter: RateLimiter) -> None:
    rate = Rate(per_s=1.0, burst=2.0)
    assert await limiter.acquire("k", rate, cost=0.0) == 0.0
    assert [await limiter.acquire("k", rate) for _ in range(2)] == [0.0, 0.0]
    # The burst is used up, yet nothing still fits, and reading takes nothing.
    assert await limiter.acquire("k", rate, cost=0.0) == 0.0
    wait = await limiter.acquire("k", rate)
    assert 0.9 <= wait <= 1.0 + 1e-6
    start = time.monotonic()
    await limiter.block("k", rate, 0.5)
    held = await limiter.acquire("k", rate, cost=0.0)
    assert 0.5 - (time.monotonic() - start) - TOLERANCE_S <= held <= 0.5 + 1e-6


async def test_holds_are_kept_in_the_limiter(limiter: RateLimiter) -> None:
    holds = Holds(limiter)
    assert await holds.held_for_s(Hold.RETRY_AFTER, "p/m") is None
    start = time.monotonic()
    await holds.hold(Hold.RETRY_AFTER, "p/m", 30.0)
    await holds.hold(Hold.RETRY_AFTER, "p/m", 1.0)  # never shortens a longer hold
    await holds.hold(Hold.EXHAUSTED, "p/n", 0.0)  # nothing to hold
    held = await holds.held_for_s(Hold.RETRY_AFTER, "p/m")
    assert held is not None and 30.0 - (time.monotonic() - start) - TOLERANCE_S <= held <= 30.0
    # Each kind and each target on its own; reading changes nothing.
    assert await holds.held_for_s(Hold.EXHAUSTED, "p/m") is None
    assert await holds.held_for_s(Hold.RETRY_AFTER, "p/other") is None
    assert await holds.held_for_s(Hold.EXHAUSTED, "p/n") is None
    again = await holds.held_for_s(Hold.RETRY_AFTER, "p/m")
    assert again is not None and again <= held
    # A hold shorter than the timer slack is no hold: a caller that slept for it goes.
    await holds.hold(Hold.EXHAUSTED, "p/short", 0.001)
    assert await holds.held_for_s(Hold.EXHAUSTED, "p/short") is None


async def test_keys_are_independent(limiter: RateLimiter) -> None:
    rate = Rate(per_s=1.0, burst=3.0)
    assert [await limiter.acquire("a", rate) for _ in range(3)] == [0.0] * 3
    assert await limiter.acquire("a", rate) > 0.9
    assert [await limiter.acquire("b", rate) for _ in range(3)] == [0.0] * 3
    assert await limiter.acquire("b", rate) > 0.9


@pytest.mark.parametrize("rate", [Rate(10, 5), Rate(3, 3), Rate(7, 7), Rate(0.3, 3),
                                  Rate(50, 5), Rate.per_minute(600), Rate.per_minute(100)])
def test_gcra_admits_the_whole_burst_whatever_the_clock(rate: Rate) -> None:
    """Float rounding of a large clock value must not refuse the burst's last unit."""
    rng = random.Random(7)
    for _ in range(200):
        now = rng.uniform(0, 1e7)
        tat, taken, wait = now, 0, 0.0
        while wait == 0.0:
            tat, wait = gcra(tat, now, rate, 1.0)
            taken += wait == 0.0
        assert taken == math.floor(rate.burst), (now, taken)


# --- Redis --------------------------------------------------------------------------------


async def test_redis_sidecars_share_one_limit(redis_server: RedisServer) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    a = RedisRateLimiter(redis_server.url, prefix=prefix)
    b = RedisRateLimiter(redis_server.url, prefix=prefix)
    try:
        rate = Rate(per_s=1.0, burst=4.0)
        taken = [await (a if i % 2 else b).acquire("k", rate) for i in range(4)]
        assert taken == [0.0] * 4
        assert await a.acquire("k", rate) > 0.9
        assert await b.acquire("k", rate) > 0.9
        await a.block("provider", rate, 2.0)
        assert await b.acquire("provider", rate) > 2.9
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_many_concurrent_callers_share_one_burst(redis_server: RedisServer) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    limiters = [RedisRateLimiter(redis_server.url, prefix=prefix) for _ in range(4)]
    try:
        rate = Rate(per_s=0.5, burst=10.0)
        waits = await asyncio.gather(*(limiters[i % 4].acquire("k", rate) for i in range(64)))
        assert sum(w == 0.0 for w in waits) == 10
    finally:
        for lim in limiters:
            await lim.aclose()


async def test_redis_cost_above_burst_needs_no_redis() -> None:
    lim = RedisRateLimiter(f"redis://127.0.0.1:{closed_port()}/0", timeout_s=0.2)
    try:
        assert await lim.acquire("k", Rate(1.0, 2.0), cost=3.0) == math.inf
        with pytest.raises(LimiterUnavailable):
            await lim.acquire("k", Rate(1.0, 2.0), cost=1.0)
    finally:
        await lim.aclose()


async def test_redis_sidecars_share_one_hold(redis_server: RedisServer) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    told, other = (RedisRateLimiter(redis_server.url, prefix=prefix) for _ in range(2))
    try:
        await Holds(told).hold(Hold.RETRY_AFTER, "p/m", 30.0)
        held = await Holds(other).held_for_s(Hold.RETRY_AFTER, "p/m")
        assert held is not None and 29.0 < held <= 30.0
    finally:
        await told.aclose()
        await other.aclose()


async def test_redis_outage_fails_fast_and_recovers(lone_redis: RedisServer) -> None:
    lim = RedisRateLimiter(lone_redis.url, prefix="t:", timeout_s=0.5)
    rate = Rate(per_s=10.0, burst=2.0)
    try:
        assert await lim.acquire("k", rate) == 0.0
        lone_redis.stop(kill=True)
        for call in (lambda: lim.acquire("k", rate), lambda: lim.charge("k", rate, 1.0),
                     lambda: lim.block("k", rate, 1.0), lambda: lim.acquire("k", rate, 0.0)):
            start = time.monotonic()
            with pytest.raises(LimiterUnavailable, match=re.escape(f"127.0.0.1:{lone_redis.port}")):
                await call()
            assert time.monotonic() - start < 0.8
        lone_redis.restart()  # same port, empty data, empty script cache
        assert await lim.acquire("k", rate) == 0.0
        assert await lim.acquire("k", rate) == 0.0
        assert await lim.acquire("k", rate) > 0.0
    finally:
        await lim.aclose()


async def test_redis_idle_keys_vanish(redis_server: RedisServer) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    lim = RedisRateLimiter(redis_server.url, prefix=prefix)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await lim.acquire("k", Rate(per_s=20.0, burst=1.0))  # TAT 50 ms ahead
        ttl_ms = await client.pttl(f"{prefix}rate:k")
        assert 0 < ttl_ms <= 52
        # Reading at cost 0 writes nothing.
        assert await lim.acquire("z", Rate(per_s=20.0, burst=1.0), 0.0) == 0.0
        assert await client.exists(f"{prefix}rate:z") == 0
    finally:
        await client.aclose()
        await lim.aclose()
