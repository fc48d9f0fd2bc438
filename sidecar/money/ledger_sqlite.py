"""The durable budget ledger of one sidecar: one SQLite file (WAL), with a reservation journal.

:class:`SQLiteBudgetStore` is a :class:`~sidecar.money.budgets.BudgetStore`: its decisions
are a :class:`~sidecar.money.ledger_memory.Book` in memory under a lock; what it must not
lose (each reservation, each settlement, each expiry) is committed on a dedicated thread,
the writes queued meanwhile grouped into one transaction. How a crash is survived is in the
class docstring.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import msgspec

from sidecar.money.budgets import (
    SETTLED_TTL_S,
    BudgetKey,
    LedgerUnavailable,
    Reserved,
    Shortfall,
    Totals,
)
from sidecar.money.ledger_memory import Book, Expired

log = logging.getLogger("sidecar.money.ledger_sqlite")

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
        self._book = Book(clock, self._write_expired)
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
                      want_max: int, want_min: int, ttl_s: float) -> Reserved | Shortfall:
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
