"""Money: what a request may cost, who pays, and the ledgers that remember it.

* :mod:`~sidecar.money.pricing` -- list prices, ``[prices]`` overrides, integer µ$ costs;
* :mod:`~sidecar.money.estimates` -- :func:`estimate`: a request's token bounds before any
  provider has seen it;
* :mod:`~sidecar.money.budgets` -- budget keys, windows, the :class:`BudgetStore` contract
  and its reservation rule (pure);
* ledgers side by side, one contract: :mod:`~sidecar.money.ledger_memory` (memory),
  :mod:`~sidecar.money.ledger_sqlite` (one sidecar, durable), :mod:`~sidecar.money.ledger_redis`
  (a fleet; imported on demand: it loads the Redis client);
* :mod:`~sidecar.money.accountant` -- :class:`Accountant`: a request's rate limits,
  reservations, holds and settlement, as the gateway calls them.
"""

from sidecar.money.accountant import Accountant, BudgetView, Ticket
from sidecar.money.budgets import (
    BudgetKey,
    BudgetStore,
    LedgerUnavailable,
    Reserved,
    Shortfall,
    Totals,
)
from sidecar.money.estimates import Estimate, estimate
from sidecar.money.ledger_memory import MemoryBudgetStore
from sidecar.money.ledger_sqlite import SQLiteBudgetStore
from sidecar.money.pricing import FREE, Price, PriceTable, cost, format_usd

__all__ = [
    "FREE",
    "Accountant",
    "BudgetKey",
    "BudgetStore",
    "BudgetView",
    "Estimate",
    "LedgerUnavailable",
    "MemoryBudgetStore",
    "Price",
    "PriceTable",
    "Reserved",
    "SQLiteBudgetStore",
    "Shortfall",
    "Ticket",
    "Totals",
    "cost",
    "estimate",
    "format_usd",
]
