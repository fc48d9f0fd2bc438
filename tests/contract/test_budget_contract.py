"""One contract for every budget store (memory, SQLite, Redis), plus each one's own promises.

The contract is the docstring of :mod:`sidecar.money.budgets`; the Redis store runs against a real
``redis-server`` (skipped when none is installed).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from sidecar.money import (
    BudgetKey,
    BudgetStore,
    LedgerUnavailable,
    MemoryBudgetStore,
    Reserved,
    Shortfall,
    SQLiteBudgetStore,
    Totals,
)
from sidecar.money.budgets import fit
from sidecar.money.ledger_redis import RedisBudgetStore
from sidecar.money.ledger_sqlite import Recovered
from sidecar.redis_client import redact_url
from tests.support.redis_server import RedisServer, redis_server_fixture

ROOT = Path(__file__).resolve().parents[2]

G = BudgetKey("global", "*", "2026-11")
K = BudgetKey("per-key", "alice", "2026-11-25")
P = BudgetKey("per-provider", "openai", "total")

redis_server = redis_server_fixture(scope="module")
lone_redis = redis_server_fixture(scope="function")


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BudgetStore]:
    s: BudgetStore
    if request.param == "memory":
        s = MemoryBudgetStore()
    elif request.param == "sqlite":
        s = SQLiteBudgetStore(tmp_path / "ledger.sqlite3")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        s = RedisBudgetStore(server.url, prefix=f"test:{uuid.uuid4().hex}:")
    yield s
    await s.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 3.0) -> float:
    """Poll ``check`` until it is true; returns the seconds it took (fails at the deadline)."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < timeout_s, "condition not met before the deadline"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


# --- the reservation rule, pure -----------------------------------------------------------


def test_fit_takes_the_smallest_room_and_names_the_first_key_short() -> None:
    assert fit([(G, 1000), (K, 300)], 500, 100) == Reserved(300)
    assert fit([(G, 1000)], 500, 100) == Reserved(500)
    assert fit([(G, 50), (K, 10)], 500, 100) == Shortfall(G, 50)  # the first one short
    assert fit([(G, 1000), (K, -20)], 500, 100) == Shortfall(K, 0)  # overspent: no room
    assert fit([(G, 0)], 5, 0) == Shortfall(G, 0)  # nothing fits in no room, not even 0
    assert fit([], 500, 100) == Reserved(500)


# --- the contract -------------------------------------------------------------------------


async def test_reserve_within_and_over_the_limit(store: BudgetStore) -> None:
    assert await store.reserve("r1", [(G, 1000)], 600, 600, 60) == Reserved(600)
    assert await store.reserve("r2", [(G, 1000)], 600, 600, 60) == Shortfall(G, 400)
    assert await store.reserve("r3", [(G, 1000)], 400, 400, 60) == Reserved(400)
    assert await store.reserve("r4", [(G, 1000)], 1, 0, 60) == Shortfall(G, 0)
    assert await store.totals([G]) == {G: Totals(spent=0, reserved=1000)}


async def test_want_max_is_capped_by_the_room_and_want_min_is_the_floor(
    store: BudgetStore,
) -> None:
    assert await store.reserve("big", [(G, 1000)], 5000, 100, 60) == Reserved(1000)
    await store.release("big")
    assert await store.reserve("a", [(G, 1000)], 700, 700, 60) == Reserved(700)
    assert await store.reserve("b", [(G, 1000)], 500, 200, 60) == Reserved(300)
    assert await store.reserve("c", [(G, 1000)], 500, 0, 60) == Shortfall(G, 0)
    await store.release("b")
    # want_min above the room: nothing, and the room is reported.
    assert await store.reserve("d", [(G, 1000)], 500, 301, 60) == Shortfall(G, 300)
    assert (await store.totals([G]))[G] == Totals(0, 700)


async def test_all_keys_are_reserved_at_once_or_none_is(store: BudgetStore) -> None:
    limits = [(G, 1000), (K, 100), (P, 50)]
    # K is the first key without room: it is named, and nothing is reserved anywhere.
    assert await store.reserve("r1", limits, 500, 200, 60) == Shortfall(K, 100)
    assert await store.totals([G, K, P]) == {G: Totals(), K: Totals(), P: Totals()}
    assert await store.reserve("r2", limits, 500, 10, 60) == Reserved(50)
    assert await store.totals([G, K, P]) == {G: Totals(0, 50), K: Totals(0, 50),
                                             P: Totals(0, 50)}
    assert await store.reserve("r3", limits, 500, 1, 60) == Shortfall(P, 0)
    assert (await store.totals([G]))[G] == Totals(0, 50)


async def test_settle_spends_the_actual_cost_even_above_the_reservation(
    store: BudgetStore,
) -> None:
    assert await store.reserve("r1", [(G, 1000), (K, 1000)], 100, 100, 60) == Reserved(100)
    await store.settle("r1", 250)
    assert await store.totals([G, K]) == {G: Totals(250, 0), K: Totals(250, 0)}
    assert await store.reserve("r2", [(G, 1000)], 1000, 1, 60) == Reserved(750)


async def test_settle_is_idempotent(store: BudgetStore) -> None:
    await store.reserve("r1", [(G, 1000)], 100, 100, 60)
    await store.settle("r1", 80)
    await store.settle("r1", 80)
    await store.settle("r1", 999)
    assert (await store.totals([G]))[G] == Totals(80, 0)
    # Replaying the whole request (same id) neither reserves nor spends again.
    again = await store.reserve("r1", [(G, 1000)], 100, 100, 60)
    assert not (isinstance(again, Reserved) and again.amount > 0)
    await store.settle("r1", 80)
    assert (await store.totals([G]))[G] == Totals(80, 0)


async def test_reserve_is_idempotent_while_the_reservation_lives(store: BudgetStore) -> None:
    assert await store.reserve("r1", [(G, 1000)], 300, 300, 60) == Reserved(300)
    assert await store.reserve("r1", [(G, 1000)], 300, 300, 60) == Reserved(300)
    assert (await store.totals([G]))[G] == Totals(0, 300)


async def test_settle_or_release_of_unknown_ids_changes_nothing(store: BudgetStore) -> None:
    await store.settle("never-reserved", 100)
    await store.release("never-reserved")
    await store.reserve("r1", [(G, 1000)], 100, 100, 60)
    await store.release("r1")
    await store.settle("r1", 100)  # released: nothing left to settle
    assert (await store.totals([G]))[G] == Totals(0, 0)


async def test_release_gives_the_room_back(store: BudgetStore) -> None:
    assert await store.reserve("r1", [(G, 1000), (K, 500)], 500, 500, 60) == Reserved(500)
    assert await store.reserve("r2", [(K, 500)], 1, 1, 60) == Shortfall(K, 0)
    await store.release("r1")
    await store.release("r1")
    assert await store.totals([G, K]) == {G: Totals(0, 0), K: Totals(0, 0)}
    assert await store.reserve("r2", [(K, 500)], 500, 500, 60) == Reserved(500)


async def test_an_expired_reservation_is_spent_at_its_amount(store: BudgetStore) -> None:
    """Never settled nor released: its owner died, and the call may have been billed."""
    assert await store.reserve("r1", [(G, 1000), (K, 2000)], 600, 600, 0.2) == Reserved(600)
    assert (await store.totals([G]))[G] == Totals(0, 600)

    async def expired() -> bool:
        return (await store.totals([G]))[G].reserved == 0

    took = await eventually(expired)
    assert took > 0.1
    assert await store.totals([G, K]) == {G: Totals(600, 0), K: Totals(600, 0)}
    await store.settle("r1", 100)  # too late: charged at its worst case already, once
    await store.release("r1")
    assert await store.totals([G, K]) == {G: Totals(600, 0), K: Totals(600, 0)}
    assert await store.reserve("r2", [(G, 1000)], 1000, 1, 60) == Reserved(400)


async def test_a_settle_or_release_after_the_expiry_changes_nothing(store: BudgetStore) -> None:
    """Even when nothing else looked at the ledger since it expired."""
    await store.reserve("r1", [(G, 1000)], 100, 100, 0.1)
    await store.reserve("r2", [(G, 1000)], 50, 50, 0.1)
    await asyncio.sleep(0.25)  # let them expire, with no other call in between
    await store.settle("r1", 70)
    await store.release("r2")
    assert (await store.totals([G]))[G] == Totals(150, 0)


async def test_totals_of_unknown_keys_are_zero(store: BudgetStore) -> None:
    assert await store.totals([G, K]) == {G: Totals(0, 0), K: Totals(0, 0)}
    assert await store.totals([]) == {}


async def test_keys_that_look_alike_are_distinct(store: BudgetStore) -> None:
    a, b = BudgetKey("a:b", "c", "total"), BudgetKey("a", "b:c", "total")
    c = BudgetKey("a%3Ab", "c", "total")
    await store.reserve("r1", [(a, 100)], 100, 100, 60)
    await store.settle("r1", 100)
    assert await store.totals([a, b, c]) == {a: Totals(100, 0), b: Totals(), c: Totals()}


async def _race(stores: list[BudgetStore]) -> tuple[int, list[Totals]]:
    """64 concurrent requests of 100 µ$ each against a 1000 µ$ budget (and a roomy one)."""
    limits = [(G, 1000), (K, 1_000_000)]
    done = asyncio.Event()
    seen: list[Totals] = []

    async def request(i: int) -> bool:
        s = stores[i % len(stores)]
        got = await s.reserve(f"req-{i}", limits, 100, 100, 30)
        if isinstance(got, Shortfall):
            assert got == Shortfall(G, 0)
            return False
        assert got == Reserved(100)
        await asyncio.sleep(0)
        await s.settle(f"req-{i}", 100)
        return True

    async def watch() -> None:
        while not done.is_set():
            seen.append((await stores[0].totals([G]))[G])
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(request(i) for i in range(64)))
    done.set()
    await watcher
    seen.append((await stores[0].totals([G]))[G])
    return sum(results), seen


async def test_concurrent_reservations_never_overshoot(store: BudgetStore) -> None:
    won, seen = await _race([store])
    assert won == 10
    assert all(t.spent + t.reserved <= 1000 for t in seen), seen
    assert seen[-1] == Totals(1000, 0)
    assert (await store.totals([K]))[K] == Totals(1000, 0)


# --- SQLite -------------------------------------------------------------------------------

_CRASHING_WRITER = textwrap.dedent("""
    import asyncio, sys
    from sidecar.money import BudgetKey, SQLiteBudgetStore

    async def main():
        store = SQLiteBudgetStore(sys.argv[1])
        key = BudgetKey("global", "*", "2026-11")
        await store.reserve("r1", [(key, 1000)], 100, 100, 60)
        await store.settle("r1", 70)
        await store.reserve("r2", [(key, 1000)], 300, 300, 60)
        await store.reserve("r3", [(key, 1000)], 50, 50, 60)
        await store.release("r3")
        print("ready", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
""")

_SECOND_OPENER = textwrap.dedent("""
    import sys
    from sidecar.money import LedgerUnavailable, SQLiteBudgetStore
    try:
        SQLiteBudgetStore(sys.argv[1])
    except LedgerUnavailable as e:
        print("unavailable:", e)
    else:
        print("opened")
""")


async def test_sqlite_a_crash_loses_no_spend_and_charges_its_reservations(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite3"

    def write_then_get_killed() -> None:
        with subprocess.Popen([sys.executable, "-c", _CRASHING_WRITER, str(path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True) as child:
            try:
                assert child.stdout is not None
                assert child.stdout.readline().strip() == "ready"
            finally:
                child.send_signal(signal.SIGKILL)
                child.wait(timeout=10)
        assert child.returncode == -signal.SIGKILL

    await asyncio.to_thread(write_then_get_killed)

    store = SQLiteBudgetStore(path)
    try:
        # r1's settle (70) counts once; r2, in flight at the kill, at its reservation (300);
        # r3 was released.
        assert store.recovered == Recovered(reservations=1, micro_usd=300)
        assert (await store.totals([G]))[G] == Totals(spent=370, reserved=0)
        for rid in ("r1", "r2"):  # replays after the restart: nothing more
            await store.settle(rid, 70)
            again = await store.reserve(rid, [(G, 1000)], 100, 100, 60)
            assert not (isinstance(again, Reserved) and again.amount > 0)
        assert await store.reserve("r4", [(G, 1000)], 1000, 1, 60) == Reserved(630)
    finally:
        await store.aclose()
    store = SQLiteBudgetStore(path)  # closed cleanly: r4 was journalled, so it is charged
    try:
        assert store.recovered == Recovered(reservations=1, micro_usd=630)
        assert (await store.totals([G]))[G] == Totals(spent=1000, reserved=0)
    finally:
        await store.aclose()
    assert SQLiteBudgetStore(path).recovered == Recovered()


async def test_sqlite_journal_follows_reserve_settle_release_and_expiry(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    store = SQLiteBudgetStore(path)
    try:
        await store.reserve("settled", [(G, 10_000), (K, 10_000)], 100, 100, 60)
        await store.settle("settled", 80)
        await store.reserve("released", [(G, 10_000)], 200, 200, 60)
        await store.release("released")
        await store.reserve("expired", [(G, 10_000), (K, 10_000)], 300, 300, 0.05)
        await eventually(lambda: _no_reservations(store))
        # A reserve whose caller is cancelled while it is being journalled never happened.
        task = asyncio.create_task(store.reserve("cancelled", [(G, 10_000)], 400, 400, 60))
        await asyncio.sleep(0)  # it has decided and is waiting for its write
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.reserve("live", [(K, 10_000)], 500, 500, 60)
        assert await store.totals([G, K]) == {G: Totals(380, 0), K: Totals(380, 500)}
    finally:
        await store.aclose()
    store = SQLiteBudgetStore(path)
    try:
        assert store.recovered == Recovered(reservations=1, micro_usd=500)  # only "live"
        assert await store.totals([G, K]) == {G: Totals(380, 0), K: Totals(880, 0)}
    finally:
        await store.aclose()


async def test_sqlite_file_is_locked_against_a_second_process(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"

    def second_open() -> str:
        return subprocess.run([sys.executable, "-c", _SECOND_OPENER, str(path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=30, check=True).stdout

    store = SQLiteBudgetStore(path)
    try:
        out = await asyncio.to_thread(second_open)
        assert out.startswith("unavailable:"), out
        assert str(path) in out
    finally:
        await store.aclose()
    assert (await asyncio.to_thread(second_open)).startswith("opened")


def test_sqlite_path_that_cannot_be_a_directory_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = blocker / "ledger.sqlite3"
    with pytest.raises(LedgerUnavailable, match=re.escape(str(path))):
        SQLiteBudgetStore(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_sqlite_unwritable_directory_is_unavailable(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    path = locked / "ledger.sqlite3"
    try:
        with pytest.raises(LedgerUnavailable, match=re.escape(str(path))):
            SQLiteBudgetStore(path)
    finally:
        locked.chmod(0o700)


# --- Redis --------------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


async def test_redis_sidecars_share_one_ledger(redis_server: RedisServer, prefix: str) -> None:
    a = RedisBudgetStore(redis_server.url, prefix=prefix)
    b = RedisBudgetStore(redis_server.url, prefix=prefix)
    try:
        assert await a.reserve("r1", [(G, 1000), (K, 500)], 400, 400, 60) == Reserved(400)
        assert await b.totals([G, K]) == {G: Totals(0, 400), K: Totals(0, 400)}
        assert await b.reserve("r2", [(K, 500)], 400, 1, 60) == Reserved(100)
        await b.settle("r1", 300)  # any sidecar can settle by id
        await a.settle("r1", 300)
        await a.release("r2")
        assert await a.totals([G, K]) == await b.totals([G, K]) == {
            G: Totals(300, 0), K: Totals(300, 0)}
        other = RedisBudgetStore(redis_server.url, prefix=prefix + "other:")
        assert (await other.totals([G]))[G] == Totals(0, 0)  # the prefix separates fleets
        await other.aclose()
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_concurrent_sidecars_never_overshoot(
    redis_server: RedisServer, prefix: str
) -> None:
    stores: list[BudgetStore] = [RedisBudgetStore(redis_server.url, prefix=prefix)
                                 for _ in range(2)]
    try:
        won, seen = await _race(stores)
    finally:
        for s in stores:
            await s.aclose()
    assert won == 10
    assert all(t.spent + t.reserved <= 1000 for t in seen), seen
    assert seen[-1] == Totals(1000, 0)


async def test_redis_reservation_of_a_crashed_sidecar_is_spent_when_it_expires(
    redis_server: RedisServer, prefix: str
) -> None:
    crashed = RedisBudgetStore(redis_server.url, prefix=prefix)
    assert await crashed.reserve("r1", [(G, 1000)], 600, 600, 0.2) == Reserved(600)
    await crashed.aclose()  # never settles nor releases
    survivor = RedisBudgetStore(redis_server.url, prefix=prefix)
    try:
        assert await survivor.reserve("r2", [(G, 1000)], 401, 401, 60) == Shortfall(G, 400)

        async def charged() -> bool:
            return (await survivor.totals([G]))[G] == Totals(600, 0)

        await eventually(charged)
        await survivor.settle("r1", 10)  # too late, from any sidecar
        assert await survivor.reserve("r2", [(G, 1000)], 1000, 1, 60) == Reserved(400)
    finally:
        await survivor.aclose()


async def test_redis_expired_reservation_is_charged_however_late_it_is_read(
    redis_server: RedisServer, prefix: str
) -> None:
    """Nothing reads the key for longer than its reservations lived: still spent, once."""
    store = RedisBudgetStore(redis_server.url, prefix=prefix)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await store.reserve("r1", [(G, 1000), (K, 1000)], 100, 100, 0.05)
        await store.reserve("r2", [(K, 1000)], 30, 30, 60)
        assert await client.pttl(f"{prefix}resv:global:*:2026-11") == -1  # no Redis TTL
        await asyncio.sleep(1.3)  # well past the expiry (and its old TTL of expiry + 1 s)
        assert await store.totals([G, K]) == {G: Totals(100, 0), K: Totals(100, 30)}
        assert await store.totals([G, K]) == {G: Totals(100, 0), K: Totals(100, 30)}
    finally:
        await client.aclose()
        await store.aclose()


async def test_redis_leaves_only_spend_and_settled_markers_behind(
    redis_server: RedisServer, prefix: str
) -> None:
    store = RedisBudgetStore(redis_server.url, prefix=prefix)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await store.reserve("r1", [(G, 1000), (K, 1000)], 10, 10, 60)
        await store.reserve("r2", [(G, 1000)], 10, 10, 60)
        await store.reserve("r3", [(G, 1000)], 10, 10, 0.05)
        await store.settle("r1", 10)
        await store.release("r2")
        await eventually(lambda: _no_reservations(store))
        names = sorted(_text(k) for k in await client.keys(prefix + "*"))
        assert names == [
            f"{prefix}settled:r1",
            f"{prefix}spend:global:*:2026-11",
            f"{prefix}spend:per-key:alice:2026-11-25",
        ]
        assert 0 < await client.ttl(f"{prefix}settled:r1") <= 86400
    finally:
        await client.aclose()
        await store.aclose()


def _text(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name


async def _no_reservations(store: BudgetStore) -> bool:
    return (await store.totals([G]))[G].reserved == 0


async def test_redis_outage_fails_fast_and_recovers(lone_redis: RedisServer) -> None:
    store = RedisBudgetStore(lone_redis.url, prefix="t:", timeout_s=0.5)
    try:
        assert await store.reserve("r1", [(G, 1000)], 100, 100, 60) == Reserved(100)
        lone_redis.stop(kill=True)
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.reserve("r2", [(G, 1000)], 100, 100, 60),
            lambda: store.settle("r1", 100),
            lambda: store.release("r1"),
            lambda: store.totals([G]),
        ]
        for call in calls:
            start = time.monotonic()
            with pytest.raises(LedgerUnavailable, match=re.escape(f"127.0.0.1:{lone_redis.port}")):
                await call()
            assert time.monotonic() - start < 0.8
        lone_redis.restart()  # same port, empty data, empty script cache
        assert await store.reserve("r3", [(G, 1000)], 100, 100, 60) == Reserved(100)
        assert (await store.totals([G]))[G] == Totals(0, 100)
    finally:
        await store.aclose()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


async def test_redis_that_does_not_answer_times_out(silent_port: int) -> None:
    store = RedisBudgetStore(f"redis://127.0.0.1:{silent_port}/0", timeout_s=0.3)
    try:
        start = time.monotonic()
        with pytest.raises(LedgerUnavailable, match=re.escape("did not answer within 0.3 s")):
            await store.reserve("r1", [(G, 1000)], 100, 100, 60)
        assert time.monotonic() - start < 0.6
    finally:
        await store.aclose()


async def test_redis_password_works_and_never_leaks() -> None:
    with RedisServer(password="hunter2-secret") as server:
        good = RedisBudgetStore(server.url)
        bad = RedisBudgetStore(server.url.replace("hunter2-secret", "wrong-pw-123"))
        try:
            assert await good.reserve("r1", [(G, 10)], 10, 10, 60) == Reserved(10)
            with pytest.raises(LedgerUnavailable) as info:
                await bad.totals([G])
            assert "wrong-pw-123" not in str(info.value)
            assert f":***@127.0.0.1:{server.port}" in str(info.value)
            server.stop()
            with pytest.raises(LedgerUnavailable) as info:
                await good.totals([G])
            assert "hunter2" not in str(info.value)
        finally:
            await good.aclose()
            await bad.aclose()


def test_redact_url() -> None:
    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("rediss://user:s3cret@host/1") == "rediss://user:***@host/1"
    assert redact_url("redis://host:6379") == "redis://host:6379"
    assert redact_url("redis://s3cret@host") == "redis://***@host"
    assert redact_url("unix:///run/redis.sock?db=1&password=s3cret") == (
        "unix:///run/redis.sock?db=1&password=***")
