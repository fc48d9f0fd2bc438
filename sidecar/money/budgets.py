"""The spend ledger: budgets, windows, reservations, settlement.

Money is integer micro-dollars (µ$) everywhere. A budget is tracked per :class:`BudgetKey`
(budget name, subject, window): the subject is ``*`` for a global budget, the key's name for
a per-key budget, the provider's name for a per-provider budget; the window is ``total``,
``2026-11`` (month) or ``2026-11-25`` (day), UTC.

Every store implements :class:`BudgetStore` with the same semantics (one contract test
suite runs against all of them):

* :meth:`~BudgetStore.reserve` is one atomic step for all the budgets of a request: it
  reserves ``min(want_max, room)`` where ``room`` is the smallest ``limit - spent -
  reserved`` among them, if that is at least ``want_min``; otherwise it reserves nothing
  and returns the first budget without room. So concurrent requests can never push spend
  past a limit.
* :meth:`~BudgetStore.settle` replaces a reservation by the actual cost (which is spent
  even if it exceeds the reservation: the provider charged it). It is idempotent: a
  reservation settles once, a replay of the same id changes nothing.
* :meth:`~BudgetStore.release` drops a reservation (the call failed; nothing was spent).
* Reservations expire after ``ttl_s`` (longer than any call may take). A reservation that
  expires was neither settled nor released: its owner died, or lost the ledger when it
  tried. The call may have been billed, so an expired reservation is **spent at its
  reserved amount** (the worst case), never dropped; a settle or release after that
  changes nothing.
* :meth:`~BudgetStore.totals` reads spent and reserved per key.

What a crash (SIGKILL, power loss aside) costs, per store: never a lost charge, at most
the worst case of the calls in flight.

* :class:`MemoryBudgetStore`: nothing survives a restart, by definition (spend included).
* :class:`SQLiteBudgetStore`: every reservation is journalled (id, amount, budget keys) and
  committed before :meth:`~BudgetStore.reserve` returns, so before the provider is called;
  settle replaces the journal row by the spend in one transaction (so it is idempotent
  across a crash: either the row or the spend is there, never both). Opening the ledger
  charges every row left by a killed process at its reserved amount.
* :class:`sidecar.money.redis_ledger.RedisBudgetStore`: reservations live in Redis; one left by a
  dead sidecar keeps counting as reserved until it expires and is then spent at its amount
  (by whichever sidecar's script sees it first; the result is the same).

Stores raise :class:`LedgerUnavailable` when they cannot read or write (disk full,
unwritable file, Redis down); the gateway decides what that means for the request.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Protocol

import msgspec

Window = Literal["day", "month", "total"]

log = logging.getLogger("sidecar.money.budgets")


class LedgerUnavailable(Exception):
    """The ledger cannot be read or written; the message says why (never a secret)."""


class BudgetKey(msgspec.Struct, frozen=True, order=True):
    budget: str
    subject: str
    window: str

    def __str__(self) -> str:
        return f"{self.budget}:{self.subject}:{self.window}"


class Totals(msgspec.Struct, frozen=True):
    spent: int = 0
    reserved: int = 0


class Reserved(msgspec.Struct, frozen=True):
    """A successful reservation of ``amount`` µ$ on every key."""

    amount: int


class NoRoom(msgspec.Struct, frozen=True):
    """The reservation failed: ``key`` has only ``room`` µ$ left (limit - spent - reserved)."""

    key: BudgetKey
    room: int


class BudgetStore(Protocol):
    async def reserve(self, rid: str, limits: Sequence[tuple[BudgetKey, int]],
                      want_max: int, want_min: int, ttl_s: float) -> Reserved | NoRoom:
        """Reserve on every ``(key, limit)`` at once; see the module contract."""
        ...

    async def settle(self, rid: str, actual: int) -> None:
        """Turn reservation ``rid`` into ``actual`` µ$ spent on each of its keys, once."""
        ...

    async def release(self, rid: str) -> None:
        """Drop reservation ``rid`` without spending."""
        ...

    async def totals(self, keys: Sequence[BudgetKey]) -> dict[BudgetKey, Totals]:
        ...

    async def aclose(self) -> None:
        ...


def window_of(window: Window, now: float) -> str:
    """The window label containing ``now`` (epoch seconds, UTC)."""
    if window == "total":
        return "total"
    d = datetime.datetime.fromtimestamp(now, datetime.UTC)
    return d.strftime("%Y-%m") if window == "month" else d.strftime("%Y-%m-%d")


def window_reset(window: Window, now: float) -> float | None:
    """Epoch seconds when the window containing ``now`` ends (None for ``total``)."""
    if window == "total":
        return None
    d = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if window == "day":
        start = datetime.datetime(d.year, d.month, d.day, tzinfo=datetime.UTC)
        return (start + datetime.timedelta(days=1)).timestamp()
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return datetime.datetime(year, month, 1, tzinfo=datetime.UTC).timestamp()


SETTLED_TTL_S = 86400
"""How long a settled reservation id is remembered (a replay within it changes nothing)."""


def replayed(limits: Sequence[tuple[BudgetKey, int]]) -> Reserved | NoRoom:
    """What reserving an already settled id gets: nothing (it is finished)."""
    return NoRoom(limits[0][0], 0) if limits else Reserved(0)


# --- in memory --------------------------------------------------------------------------------

Expired = tuple[str, int, tuple[BudgetKey, ...]]
"""An expired reservation: its id, amount and budget keys."""


class _Book:
    """The shared bookkeeping of the in-process stores (memory, and SQLite's decisions)."""

    def __init__(self, clock: Callable[[], float],
                 on_expired: Callable[[list[Expired]], None] | None = None) -> None:
        """``on_expired`` is told about the reservations each expiry spent (SQLite writes
        them down); it runs under the caller's lock and must not block."""
        self.spent: dict[BudgetKey, int] = {}
        self.reservations: dict[str, tuple[float, int, tuple[BudgetKey, ...]]] = {}
        self.settled: dict[str, float] = {}
        """Settled ids -> when, oldest first; each kept for :data:`SETTLED_TTL_S`."""
        self.settling: set[str] = set()
        """Claimed ids whose spend is being written: they do not expire meanwhile."""
        self.clock = clock
        self.on_expired = on_expired

    def reserved(self, key: BudgetKey) -> int:
        return sum(a for _, a, keys in self.reservations.values() if key in keys)

    def expire(self) -> list[Expired]:
        """Spend every expired reservation at its amount (see the module contract)."""
        now = self.clock()
        gone = [(rid, amount, keys) for rid, (exp, amount, keys) in self.reservations.items()
                if exp <= now and rid not in self.settling]
        for rid, amount, keys in gone:
            del self.reservations[rid]
            self.spend(keys, amount)
        if gone and self.on_expired is not None:
            self.on_expired(gone)
        return gone

    def reserve(self, rid: str, limits: Sequence[tuple[BudgetKey, int]], want_max: int,
                want_min: int, ttl_s: float) -> Reserved | NoRoom:
        if rid in self.settled:
            return replayed(limits)
        self.expire()
        if rid in self.reservations:
            return Reserved(self.reservations[rid][1])
        amount = want_max
        for key, limit in limits:
            room = limit - self.spent.get(key, 0) - self.reserved(key)
            if room < max(want_min, 1):
                return NoRoom(key, max(0, room))
            amount = min(amount, room)
        amount = max(amount, want_min)
        self.reservations[rid] = (self.clock() + ttl_s, amount, tuple(k for k, _ in limits))
        return Reserved(amount)

    def claim(self, rid: str) -> tuple[BudgetKey, ...] | None:
        """Mark live reservation ``rid`` settled (a replay is then a no-op) and return its
        keys; None when it is unknown, expired, released or settled already."""
        self.expire()  # an expired reservation is spent already, purged yet or not
        if rid in self.settled or rid not in self.reservations:
            return None
        now = self.clock()
        while self.settled:
            oldest = next(iter(self.settled))
            if self.settled[oldest] >= now - SETTLED_TTL_S:
                break
            del self.settled[oldest]
        self.settled[rid] = now
        self.settling.add(rid)
        return self.reservations[rid][2]

    def unclaim(self, rid: str) -> None:
        """The spend of claimed ``rid`` was not recorded: its reservation stands."""
        self.settled.pop(rid, None)
        self.settling.discard(rid)

    def record(self, rid: str, keys: Sequence[BudgetKey], actual: int) -> None:
        """Turn claimed reservation ``rid`` into spend."""
        self.settling.discard(rid)
        self.reservations.pop(rid, None)
        self.spend(keys, actual)

    def spend(self, keys: Sequence[BudgetKey], actual: int) -> None:
        for key in keys:
            self.spent[key] = self.spent.get(key, 0) + actual

    def totals(self, keys: Sequence[BudgetKey]) -> dict[BudgetKey, Totals]:
        self.expire()
        return {k: Totals(self.spent.get(k, 0), self.reserved(k)) for k in keys}


class MemoryBudgetStore:
    """Budgets in process memory: exact and fast, gone on restart (tests, ephemeral use).

    Nothing survives a restart, by definition: spend and reservations start at zero."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._book = _Book(clock)

    async def reserve(self, rid: str, limits: Sequence[tuple[BudgetKey, int]],
                      want_max: int, want_min: int, ttl_s: float) -> Reserved | NoRoom:
        return self._book.reserve(rid, limits, want_max, want_min, ttl_s)

    async def settle(self, rid: str, actual: int) -> None:
        keys = self._book.claim(rid)
        if keys is not None:
            self._book.record(rid, keys, actual)

    async def release(self, rid: str) -> None:
        self._book.reservations.pop(rid, None)

    async def totals(self, keys: Sequence[BudgetKey]) -> dict[BudgetKey, Totals]:
        return self._book.totals(keys)

    async def aclose(self) -> None:
        pass


# --- SQLite -----------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    budget TEXT NOT NULL, subject TEXT NOT NULL, window TEXT NOT NULL,
    micro_usd INTEGER NOT NULL,
    PRIMARY KEY (budget, subject, window)
);
CREATE TABLE IF NOT EXISTS settled (rid TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS reservation (
    rid TEXT PRIMARY KEY, micro_usd INTEGER NOT NULL, keys TEXT NOT NULL
);
"""

_SPEND = ("INSERT INTO spend VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE "
          "SET micro_usd = micro_usd + excluded.micro_usd")

_keys_codec = msgspec.json.Decoder(list[tuple[str, str, str]])


_Write = tuple[str, Callable[[], object], Future[None]]
"""A queued ledger write: what it is (for errors), its statements, its outcome."""


class Recovered(msgspec.Struct, frozen=True):
    """What opening a ledger charged for the reservations a killed process left."""

    reservations: int = 0
    micro_usd: int = 0


class SQLiteBudgetStore:
    """Durable budgets in one SQLite file (WAL), for one sidecar process.

    Each new reservation is journalled (id, amount, budget keys) and committed before
    :meth:`reserve` returns, so before the provider is called; :meth:`settle` commits the
    spend and removes the journal row in one transaction before it returns, so a SIGKILL
    at any point loses no charge and counts none twice. :meth:`release` removes the row.
    Opening the ledger spends every row a killed process left at its reserved amount
    (:attr:`recovered` says how many and how much): the crashed call may have been billed.
    Settled ids are kept for a day so a replay does not count twice. The file is locked
    against a second process (SQLite's exclusive locking mode). Every write runs on one
    dedicated thread, off the event loop; a call awaits only its own write, and the writes
    queued while one commits commit together in the next transaction (group commit).

    ``synchronous = "NORMAL"`` (WAL) makes each commit survive a crash of the process;
    ``"FULL"`` also a crash of the host (an fsync per commit).
    """

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time,
                 synchronous: Literal["NORMAL", "FULL"] = "NORMAL") -> None:
        """Open or create the ledger; raises :class:`LedgerUnavailable`."""
        self._path = Path(path)
        self._book = _Book(clock, self._write_expired)
        self._clock = clock
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sidecar-ledger")
        self._queue: list[_Write] = []
        self._queue_lock = threading.Lock()
        self.recovered = Recovered()
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self._path, check_same_thread=False,
                                       isolation_level=None, timeout=0.5)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.executescript(_SCHEMA)
            self._db.execute("BEGIN IMMEDIATE")  # takes the exclusive lock now
            self._db.execute("DELETE FROM settled WHERE at < ?", (clock() - SETTLED_TTL_S,))
            self.recovered = self._recover()
            for budget, subject, window, amount in self._db.execute(
                "SELECT budget, subject, window, micro_usd FROM spend"
            ):
                self._book.spent[BudgetKey(budget, subject, window)] = amount
            self._book.settled = dict(self._db.execute(
                "SELECT rid, at FROM settled ORDER BY at"))
            self._db.execute("COMMIT")
        except (sqlite3.Error, OSError, msgspec.DecodeError) as e:
            raise LedgerUnavailable(f"cannot open the budget ledger {self._path}: {e}") from None

    def _recover(self) -> Recovered:
        """Spend the journalled reservations of a killed process at their amounts (inside
        the opening transaction)."""
        rows = self._db.execute("SELECT rid, micro_usd, keys FROM reservation").fetchall()
        now = self._clock()
        for rid, amount, keys in rows:
            self._db.executemany(_SPEND, [(*k, amount) for k in _keys_codec.decode(keys)])
            self._db.execute("INSERT OR IGNORE INTO settled VALUES (?, ?)", (rid, now))
        self._db.execute("DELETE FROM reservation")
        return Recovered(len(rows), sum(amount for _, amount, _ in rows))

    def _write(self, what: str, statements: Callable[[], object]) -> Future[None]:
        """Queue ``statements`` for the ledger thread; the future is done once they are
        committed. Writes queued while one commits go together in the next transaction
        (a group commit), in order, so a burst costs one commit, not one each."""
        future: Future[None] = Future()
        with self._queue_lock:
            self._queue.append((what, statements, future))
            first = len(self._queue) == 1
        if first:
            self._executor.submit(self._flush)
        return future

    def _flush(self) -> None:
        """Commit everything queued (on the ledger thread). When the group fails, each
        write is retried alone, so only the ones that fail by themselves report it."""
        with self._queue_lock:
            batch, self._queue = self._queue, []
        batch = [w for w in batch if w[2].set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            self._commit(batch)
        except sqlite3.Error as e:
            if len(batch) == 1:
                batch[0][2].set_exception(self._unavailable(batch[0][0], e))
                return
            for write in batch:
                try:
                    self._commit([write])
                except sqlite3.Error as e1:
                    write[2].set_exception(self._unavailable(write[0], e1))
                else:
                    write[2].set_result(None)
        else:
            for _, _, future in batch:
                future.set_result(None)

    def _commit(self, batch: list[_Write]) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for _, statements, _ in batch:
                statements()
            self._db.execute("COMMIT")
        except sqlite3.Error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _unavailable(self, what: str, e: sqlite3.Error) -> LedgerUnavailable:
        return LedgerUnavailable(f"cannot write the budget ledger {self._path} ({what}): {e}")

    def _write_spend(self, rid: str, keys: Sequence[BudgetKey], actual: int,
                     settled: bool) -> Future[None]:
        """Turn journalled reservation ``rid`` into ``actual`` spend."""
        def statements() -> None:
            self._db.executemany(
                _SPEND, [(k.budget, k.subject, k.window, actual) for k in keys])
            if settled:
                self._db.execute("INSERT INTO settled VALUES (?, ?)", (rid, self._clock()))
            self._db.execute("DELETE FROM reservation WHERE rid = ?", (rid,))

        return self._write("settle" if settled else "expiry", statements)

    def _write_expired(self, gone: list[Expired]) -> None:
        """Write down what an expiry spent (called under the lock: queued, not awaited).
        If the write fails the rows stay, and the next start spends them the same."""
        for rid, amount, keys in gone:
            self._write_spend(rid, keys, amount, settled=False).add_done_callback(_log_failure)

    def _forget(self, rid: str) -> Future[None]:
        """Drop the journal row of ``rid`` (queued after any write of it)."""
        return self._write("release", lambda: self._db.execute(
            "DELETE FROM reservation WHERE rid = ?", (rid,)))

    async def reserve(self, rid: str, limits: Sequence[tuple[BudgetKey, int]],
                      want_max: int, want_min: int, ttl_s: float) -> Reserved | NoRoom:
        # The decision is made in memory under the lock (so concurrent reserves see each
        # other at once); the journal row is committed off the loop before this returns.
        with self._lock:
            before = self._book.reservations.get(rid)
            result = self._book.reserve(rid, limits, want_max, want_min, ttl_s)
            entry = self._book.reservations.get(rid)
        if not isinstance(result, Reserved) or entry is None or entry is before:
            return result  # no room, a replay, or the same live reservation again
        _, amount, keys = entry
        row = (rid, amount, msgspec.json.encode([[k.budget, k.subject, k.window]
                                                 for k in keys]).decode())

        written = asyncio.wrap_future(self._write("reserve", lambda: self._db.execute(
            "INSERT OR REPLACE INTO reservation VALUES (?, ?, ?)", row)))
        try:
            # Shielded: a cancelled caller will not call the provider, so the row is
            # dropped again below, after the write (never racing it).
            await asyncio.shield(written)
        except BaseException:
            with self._lock:
                if self._book.reservations.get(rid) is entry:
                    del self._book.reservations[rid]
            if not written.done() or (not written.cancelled() and written.exception() is None):
                self._forget(rid).add_done_callback(_log_failure)
            written.add_done_callback(_retrieve)
            raise
        return result

    async def settle(self, rid: str, actual: int) -> None:
        # The lock guards only the in-memory book, never the disk write, so reserve and
        # totals on the event loop never wait for a commit. Claiming ``rid`` first makes a
        # concurrent replay a no-op.
        with self._lock:
            keys = self._book.claim(rid)
        if keys is None:
            return

        def recorded(done: Future[None]) -> None:  # runs however the awaiting task ends
            with self._lock:
                if done.cancelled() or done.exception() is not None:
                    self._book.unclaim(rid)  # not recorded: the reservation stands
                else:
                    self._book.record(rid, keys, actual)

        future = self._write_spend(rid, keys, actual, settled=True)
        future.add_done_callback(recorded)
        await asyncio.wrap_future(future)

    async def release(self, rid: str) -> None:
        with self._lock:
            known = self._book.reservations.pop(rid, None) is not None
        if known:  # shielded: once asked, the row goes even if the caller is cancelled
            await asyncio.shield(asyncio.wrap_future(self._forget(rid)))

    async def totals(self, keys: Sequence[BudgetKey]) -> dict[BudgetKey, Totals]:
        with self._lock:
            return self._book.totals(keys)

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                self._db.close()

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=True)


def _log_failure(done: Future[None]) -> None:
    if not done.cancelled() and (e := done.exception()) is not None:
        log.warning("%s", e)


def _retrieve(done: asyncio.Future[None]) -> None:
    """Mark the outcome of an abandoned write as seen (its failure was handled)."""
    if not done.cancelled():
        done.exception()
