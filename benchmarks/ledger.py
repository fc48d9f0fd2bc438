"""What the SQLite ledger costs a paid request: reserve and settle latency, in process.

A fresh ledger in a temporary directory; ``--requests`` reserve + settle pairs, one at a
time (``--concurrency 1``) or from that many tasks at once on one event loop (each
reserve and each settle timed on its own, so queueing behind the ledger thread counts).
Uses only the public :class:`sidecar.money.ledger_sqlite.SQLiteBudgetStore` API, so the same
script measures any version of it (``PYTHONPATH`` picks which):

    python benchmarks/ledger.py [--requests 5000] [--concurrency 1,32] [--synchronous NORMAL]

Prints a Markdown table on stdout: p50 / p99 / max in microseconds per operation.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

try:
    from sidecar.money import BudgetKey, Reserved, SQLiteBudgetStore
except ImportError:  # a tree from before the money package re-exported its ledgers
    from sidecar.money.budgets import BudgetKey, Reserved, SQLiteBudgetStore  # type: ignore

KEYS = [(BudgetKey("daily", "*", "2026-12-02"), 10**15),
        (BudgetKey("per-key", "frontend", "2026-12"), 10**15)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(path: Path, requests: int, concurrency: int, synchronous: str
                  ) -> dict[str, list[float]]:
    store = SQLiteBudgetStore(path, synchronous="FULL" if synchronous == "FULL" else "NORMAL")
    times: dict[str, list[float]] = {"reserve": [], "settle": []}
    queue = list(range(requests))

    async def worker() -> None:
        while queue:
            queue.pop()
            rid = uuid.uuid4().hex
            t0 = time.perf_counter()
            got = await store.reserve(rid, KEYS, 2400, 2400, 3660)
            t1 = time.perf_counter()
            assert isinstance(got, Reserved)
            await store.settle(rid, 2000)
            t2 = time.perf_counter()
            times["reserve"].append((t1 - t0) * 1e6)
            times["settle"].append((t2 - t1) * 1e6)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await store.aclose()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL")
    args = parser.parse_args()
    print("| concurrency | operation | p50 µs | p99 µs | max µs | mean µs |")
    print("|---|---|---|---|---|---|")
    for c in (int(x) for x in args.concurrency.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            times = asyncio.run(measure(Path(tmp) / "ledger.sqlite3", args.requests, c,
                                        args.synchronous))
        for op, values in times.items():
            print(f"| {c} | {op} | {percentile(values, 0.5):.0f} | "
                  f"{percentile(values, 0.99):.0f} | {max(values):.0f} | "
                  f"{statistics.fmean(values):.0f} |")


if __name__ == "__main__":
    main()
