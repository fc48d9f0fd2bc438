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
  and returns the first budget without room (a :class:`Shortfall`). So concurrent requests
  can never push spend past a limit. :func:`fit` is that rule, pure.
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

* :class:`~sidecar.money.ledger_memory.MemoryBudgetStore`: nothing survives a restart, by
  definition (spend included).
* :class:`~sidecar.money.ledger_sqlite.SQLiteBudgetStore`: every reservation is journalled
  (id, amount, budget keys) and committed before :meth:`~BudgetStore.reserve` returns, so
  before the provider is called; settle replaces the journal row by the spend in one
  transaction (so it is idempotent across a crash: either the row or the spend is there,
  never both). Opening the ledger charges every row left by a killed process at its
  reserved amount.
* :class:`~sidecar.money.ledger_redis.RedisBudgetStore`: reservations live in Redis; one
  left by a dead sidecar keeps counting as reserved until it expires and is then spent at
  its amount (by whichever sidecar's script sees it first; the result is the same).

Stores raise :class:`LedgerUnavailable` when they cannot read or write (disk full,
unwritable file, Redis down); the gateway decides what that means for the request.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from typing import Literal, Protocol

import msgspec

Window = Literal["day", "month", "total"]


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


class Shortfall(msgspec.Struct, frozen=True):
    """The reservation failed: ``key`` has only ``room`` µ$ left (limit - spent - reserved)."""

    key: BudgetKey
    room: int


class BudgetStore(Protocol):
    async def reserve(self, rid: str, limits: Sequence[tuple[BudgetKey, int]],
                      want_max: int, want_min: int, ttl_s: float) -> Reserved | Shortfall:
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


def fit(rooms: Iterable[tuple[BudgetKey, int]], want_max: int, want_min: int
        ) -> Reserved | Shortfall:
    """The reservation rule, given each key's room (limit - spent - reserved): the amount
    is ``min(want_max, smallest room)``, at least ``want_min``; a key whose room is below
    ``max(want_min, 1)`` refuses it (the first such key, with its room, at least 0). The
    Redis store's script applies the same rule."""
    amount = want_max
    for key, room in rooms:
        if room < max(want_min, 1):
            return Shortfall(key, max(0, room))
        amount = min(amount, room)
    return Reserved(max(amount, want_min))


def replayed(limits: Sequence[tuple[BudgetKey, int]]) -> Reserved | Shortfall:
    """What reserving an already settled id gets: nothing (it is finished)."""
    return Shortfall(limits[0][0], 0) if limits else Reserved(0)
