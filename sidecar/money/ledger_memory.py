"""The in-process bookkeeping of budgets, and the ledger that keeps it only in memory.

:class:`Book` applies the contract of :mod:`sidecar.money.budgets` (the reservation rule
:func:`~sidecar.money.budgets.fit`, expiry spent at the reserved amount, settled ids
remembered for :data:`~sidecar.money.budgets.SETTLED_TTL_S`) over plain dicts; it is the
memory ledger itself and the decisions of :class:`~sidecar.money.ledger_sqlite.SQLiteBudgetStore`.
:class:`MemoryBudgetStore` is a :class:`~sidecar.money.budgets.BudgetStore` over one book.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from sidecar.money.budgets import (
    SETTLED_TTL_S,
    BudgetKey,
    Reserved,
    Shortfall,
    Totals,
    fit,
    replayed,
)

Expired = tuple[str, int, tuple[BudgetKey, ...]]
"""An expired reservation: its id, amount and budget keys."""


class Book:
    """The bookkeeping of the in-process stores (memory, and SQLite's decisions): spend,
    live reservations and settled ids, over an injected clock. No I/O, no locks: the owner
    serializes calls."""

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
                want_min: int, ttl_s: float) -> Reserved | Shortfall:
        if rid in self.settled:
            return replayed(limits)
        self.expire()
        if rid in self.reservations:
            return Reserved(self.reservations[rid][1])
        result = fit(((key, limit - self.spent.get(key, 0) - self.reserved(key))
                      for key, limit in limits), want_max, want_min)
        if isinstance(result, Reserved):
            self.reservations[rid] = (self.clock() + ttl_s, result.amount,
                                      tuple(k for k, _ in limits))
        return result

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
        self._book = Book(clock)

    async def reserve(self, rid: str, limits: Sequence[tuple[BudgetKey, int]],
                      want_max: int, want_min: int, ttl_s: float) -> Reserved | Shortfall:
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
