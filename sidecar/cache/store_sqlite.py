"""The host's response cache: one SQLite file, kept across restarts.

:class:`SQLiteCacheStore` is a :class:`~sidecar.cache.store.CacheStore`. Every statement
runs on one dedicated thread (its own connection), so the event loop never waits on the
disk. Times are wall-clock seconds (a restart keeps its entries' ages). Evicts expired
values first, then the least recently used (a hit updates ``used``). The total size is
kept in the file by triggers, so several processes sharing the file agree on it.

The file is a cache: WAL with ``synchronous = NORMAL`` (a power cut may lose the last
answers kept, never the file). A file that is not a cache of this layout, or a directory
that cannot be written, is refused when the store is opened.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from sidecar.cache.store import CacheUnavailable

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entry (
    key TEXT PRIMARY KEY, expires REAL NOT NULL, used REAL NOT NULL,
    size INTEGER NOT NULL, value BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entry_used ON entry (used);
CREATE TABLE IF NOT EXISTS total (one INTEGER PRIMARY KEY CHECK (one = 1), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO total VALUES (1, 0);
CREATE TRIGGER IF NOT EXISTS entry_added AFTER INSERT ON entry
    BEGIN UPDATE total SET bytes = bytes + new.size; END;
CREATE TRIGGER IF NOT EXISTS entry_removed AFTER DELETE ON entry
    BEGIN UPDATE total SET bytes = bytes - old.size; END;
"""

class SQLiteCacheStore:
    """See the module docstring. Opening it (the constructor) creates the file and its
    directory; raises :class:`CacheUnavailable` naming the path when it cannot.
    ``clock``: wall-clock seconds (for tests; default :func:`time.time`)."""

    def __init__(self, path: Path, *, max_bytes: int, max_entry_bytes: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._path = path
        self._clock = clock
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sidecar-cache")
        self._closed = False
        try:
            self._db = self._thread.submit(self._open).result()
        except (OSError, sqlite3.Error) as e:
            self._thread.shutdown()
            raise CacheUnavailable(f"cannot open the response cache {path}: {e}") from None

    def _open(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA busy_timeout = 1000")
            db.executescript(_SCHEMA)
            db.execute("SELECT key, expires, used, size, value FROM entry LIMIT 0")
        except sqlite3.Error:
            db.close()
            raise
        return db

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        if self._closed:
            raise CacheUnavailable("the response cache is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn)
        except sqlite3.Error as e:
            raise CacheUnavailable(f"response cache {self._path} ({what}): {e}") from None

    async def get(self, key: str) -> bytes | None:
        now = self._clock()

        def read() -> bytes | None:
            row = self._db.execute(
                "SELECT value FROM entry WHERE key = ? AND expires > ?", (key, now)).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE entry SET used = ? WHERE key = ?", (now, key))
            return bytes(row[0])

        return await self._run("get", read)

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        now = self._clock()
        keep = len(value) <= self.max_entry_bytes

        def write() -> None:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM entry WHERE key = ?", (key,))
                if keep:
                    self._make_room(len(value), now)
                    db.execute("INSERT INTO entry VALUES (?, ?, ?, ?, ?)",
                               (key, now + ttl_s, now, len(value), value))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run("put", write)

    def _make_room(self, size: int, now: float) -> None:
        db = self._db
        if self._total() + size <= self.max_bytes:
            return
        db.execute("DELETE FROM entry WHERE expires <= ?", (now,))
        while self._total() + size > self.max_bytes:
            db.execute("DELETE FROM entry WHERE key = "
                       "(SELECT key FROM entry ORDER BY used LIMIT 1)")

    def _total(self) -> int:
        return int(self._db.execute("SELECT bytes FROM total").fetchone()[0])

    async def size_bytes(self) -> int:
        """The values kept now, together (expired ones not yet evicted included)."""
        return await self._run("size", self._total)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._thread, self._db.close)
        self._thread.shutdown()
