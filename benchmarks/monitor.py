"""What the resource monitor costs: one ``Sampler.sample()`` call, and a Monitor left running.

``Sampler.sample()`` is timed with 0, 1 and 4 listed worker processes (idle ``sleep``
children) and with NVML on and off (NVML "on" on a host without an NVIDIA driver measures
the cost of having tried it once: nothing). Then a Monitor samples at ``--interval`` for
``--duration`` seconds on an otherwise idle event loop, and this process's CPU time over
that wall time is its cost, in % of one core.

    python benchmarks/monitor.py [--samples 2000] [--interval 1] [--duration 10]

Prints a Markdown table on stdout, progress on stderr. Takes about 2 x ``--duration`` + 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from harness import log

from sidecar.host.sampler import Monitor, ResourceSnapshot, Sampler

WORKER_COUNTS = (0, 1, 4)


@dataclass(frozen=True)
class Row:
    case: str
    median_ms: float
    p99_ms: float


@contextlib.contextmanager
def idle_children(n: int) -> Iterator[list[tuple[str, int]]]:
    procs = [subprocess.Popen(["sleep", "600"]) for _ in range(n)]
    try:
        yield [(f"model-{i}", p.pid) for i, p in enumerate(procs)]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def time_samples(nvml: bool, workers: Sequence[tuple[str, int]], samples: int) -> Row:
    sampler = Sampler(nvml=nvml)
    try:
        sampler.sample(workers)  # NVML init, first sight of each worker
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            sampler.sample(workers)
            times.append(time.perf_counter() - start)
    finally:
        sampler.close()
    times.sort()
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    return Row(f"sample(), {len(workers)} listed workers, NVML {'on' if nvml else 'off'}",
               statistics.median(times) * 1e3, p99 * 1e3)


def first_sample_ms() -> float:
    """The one-off first sample with NVML on: importing pynvml and trying nvmlInit."""
    sampler = Sampler(nvml=True)
    start = time.perf_counter()
    sampler.sample([])
    elapsed = time.perf_counter() - start
    sampler.close()
    return elapsed * 1e3


async def idle_cost(duration_s: float) -> float:
    """% of one core this process uses with an event loop that only sleeps (the baseline)."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(duration_s)
    return 100 * (time.process_time() - cpu0) / (time.perf_counter() - wall0)


async def monitor_cost(interval_s: float, duration_s: float,
                       workers: Sequence[tuple[str, int]]) -> tuple[float, int]:
    """(% of one core this process used while a Monitor ran, samples taken)."""
    count = 0

    def on_sample(snapshot: ResourceSnapshot) -> None:
        nonlocal count
        count += 1

    monitor = Monitor(Sampler(), interval_s, lambda: workers, on_sample)
    await monitor.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(duration_s)
    cpu1, wall1 = time.process_time(), time.perf_counter()
    await monitor.aclose()
    return 100 * (cpu1 - cpu0) / (wall1 - wall0), count


def markdown_table(rows: Sequence[Row], first_ms: float,
                   cpu_rows: Sequence[tuple[str, float]]) -> str:
    lines = ["| case | median | p99 |", "|---|---|---|"]
    lines += [f"| {r.case} | {r.median_ms:.3f} ms | {r.p99_ms:.3f} ms |" for r in rows]
    lines.append(f"| first sample(), NVML on: import pynvml, try nvmlInit (once) "
                 f"| {first_ms:.1f} ms | |")
    lines += [f"| {label} | {pct:.3f} % of one core | |" for label, pct in cpu_rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=2000,
                   help="timed sample() calls per case (default 2000)")
    p.add_argument("--interval", type=float, default=1.0,
                   help="Monitor interval in seconds (default 1)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds the Monitor runs for the CPU measure (default 10)")
    args = p.parse_args(argv)
    if args.samples < 1 or args.interval <= 0 or args.duration <= 0:
        p.error("--samples must be >= 1, --interval and --duration > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    first_ms = first_sample_ms()
    rows = []
    with idle_children(max(WORKER_COUNTS)) as children:
        for nvml in (False, True):
            for n in WORKER_COUNTS:
                log(f"timing {args.samples} samples: {n} workers, NVML {nvml}")
                rows.append(time_samples(nvml, children[:n], args.samples))
        log(f"an idle event loop for {args.duration:g} s (baseline)")
        idle_pct = asyncio.run(idle_cost(args.duration))
        log(f"a Monitor at {args.interval:g} s for {args.duration:g} s, 1 worker")
        pct, count = asyncio.run(monitor_cost(args.interval, args.duration, children[:1]))
    cpu_rows = [
        (f"idle event loop, {args.duration:g} s: process CPU / wall", idle_pct),
        (f"Monitor at {args.interval:g} s, 1 worker, {args.duration:g} s ({count} samples): "
         "process CPU / wall", pct),
    ]
    print(markdown_table(rows, first_ms, cpu_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
