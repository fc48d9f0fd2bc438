"""Unary chat over gRPC next to the same load over HTTP, through one ``sidecar serve``.

The upstream is the scripted fake provider (``python -m tests.support.fake_provider``, its
default answer: a small chat completion). One sidecar serves both front ends; for each
concurrency the same number of clients send ``Chat`` (gRPC, one shared channel: HTTP/2
multiplexes the calls) and ``POST /v1/chat/completions`` (HTTP/1.1, one keep-alive
connection per client), one after the other in the same run. The load client is this
process (asyncio on uvloop; the HTTP client is a minimal raw HTTP/1.1 one, the gRPC client
grpc.aio).

    python benchmarks/grpc.py [--duration 5] [--concurrency 1,32] [--warmup 1]

With two or more cores the sidecar is pinned to core 0 and the fake provider and the
load client to core 1, so the sidecar has a core to itself (on a 2-core machine the
client and the fake share one, which caps the highest rates: compare the two protocols'
ratio, not absolute numbers across machines). Traffic goes only to 127.0.0.1. Prints a
Markdown table on stdout, progress on stderr. Two ratios: of req/s (per core where the
sidecar's core is saturated, as at c=32), and of requests per CPU-second of the sidecar
(its user + system time; per core at every concurrency, including c=1, where the run is
bound by latency, not by the sidecar's core).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and this file (grpc.py)
# would shadow the grpc package: take the folder out and put the repository in.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import psutil  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    FAKE_READY,
    SIDECAR_READY,
    exit_on_sigterm,
    free_port,
    int_list,
    log,
    running,
)
from sidecar.grpc.v1 import sidecar_pb2 as pb  # noqa: E402
from sidecar.grpc.v1 import sidecar_pb2_grpc  # noqa: E402

SIDECAR_CORE = 0
LOAD_CORE = 1  # the fake provider and this process
ROUTE = "bench"
REPLY = "Hello from fake/bench"


@dataclass(frozen=True)
class Result:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    sidecar_cpu_us: float = 0.0
    """CPU time the sidecar process spent per request (user + system)."""


@dataclass(frozen=True)
class Row:
    concurrency: int
    http: Result
    grpc: Result


# --- processes ---------------------------------------------------------------------------

def can_pin() -> bool:
    """Whether to pin the sidecar and the load to cores of their own: with two cores or
    more, and taskset to do it."""
    return (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


def pinned(core: int, pin: bool) -> list[str]:
    return ["taskset", "-c", str(core)] if pin else []


def sidecar_config(fake_port: int, grpc_port: int) -> str:
    return f"""\
[server]
host = "127.0.0.1"
port = 0
grpc_port = {grpc_port}
shutdown_grace_s = 1

[[providers]]
name = "fake"
type = "openai"
base_url = "http://127.0.0.1:{fake_port}/v1"
free = true

[[routes]]
model = "{ROUTE}"
targets = [{{ provider = "fake", model = "{ROUTE}" }}]
"""


# --- clients -----------------------------------------------------------------------------

BODY = json.dumps({"model": ROUTE, "messages": [{"role": "user", "content": "hi"}]},
                  separators=(",", ":")).encode()


class HttpClient:
    """One HTTP/1.1 keep-alive connection; just enough of the protocol for this server
    (``content-length`` bodies)."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(BODY)}\r\n\r\n"
        ).encode() + BODY
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def call(self) -> bytes:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self._port)
        assert self._reader is not None
        self._writer.write(self._request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        return await self._reader.readexactly(length)

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()


async def measure(calls: Sequence[Callable[[], Awaitable[Any]]], duration_s: float,
                  sidecar: psutil.Process) -> Result:
    """Each of ``calls`` in a loop of its own (one client each) for ``duration_s``."""
    loop = asyncio.get_running_loop()
    cpu_before = sidecar.cpu_times()
    latencies: list[float] = []
    errors = 0
    end = loop.time() + duration_s

    async def client(call: Callable[[], Awaitable[Any]]) -> None:
        nonlocal errors
        while loop.time() < end:
            start = time.perf_counter()
            try:
                await call()
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)

    started = loop.time()
    await asyncio.gather(*(client(c) for c in calls))
    elapsed = loop.time() - started
    cpu_after = sidecar.cpu_times()
    cpu_s = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    latencies.sort()
    if not latencies:
        return Result(0.0, 0.0, 0.0, errors)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3

    return Result(len(latencies) / elapsed, pct(0.50), pct(0.99), errors,
                  cpu_s / len(latencies) * 1e6)


async def bench(sidecar: psutil.Process, http_port: int, grpc_port: int,
                concurrency: Sequence[int], duration_s: float, warmup_s: float) -> list[Row]:
    request = pb.ChatRequest(model=ROUTE, messages=[pb.Message(role=pb.ROLE_USER,
                                                               content="hi")])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        reply = await stub.Chat(request, timeout=10)
        if reply.choices[0].message.content != REPLY:
            raise RuntimeError(f"gRPC: unexpected answer {reply}")
        check = HttpClient(http_port)
        body = json.loads(await check.call())
        await check.aclose()
        if body["choices"][0]["message"]["content"] != REPLY:
            raise RuntimeError(f"HTTP: unexpected answer {body}")
        log("check: one Chat over gRPC and one POST over HTTP answered")

        def grpc_call() -> Awaitable[pb.ChatResponse]:
            return stub.Chat(request, timeout=30)  # type: ignore[no-any-return]

        rows = []
        for n in concurrency:
            clients = [HttpClient(http_port) for _ in range(n)]
            try:
                if warmup_s:
                    await measure([c.call for c in clients], warmup_s, sidecar)
                http = await measure([c.call for c in clients], duration_s, sidecar)
            finally:
                await asyncio.gather(*(c.aclose() for c in clients))
            log(f"http  c={n}: {http}")
            if warmup_s:
                await measure([grpc_call] * n, warmup_s, sidecar)
            grpc_result = await measure([grpc_call] * n, duration_s, sidecar)
            log(f"grpc  c={n}: {grpc_result}")
            rows.append(Row(n, http, grpc_result))
    return rows


# --- report ------------------------------------------------------------------------------

def markdown_table(rows: Sequence[Row]) -> str:
    header = ["concurrency", "HTTP req/s", "HTTP p50 ms", "HTTP p99 ms", "HTTP sidecar CPU µs/req",
              "gRPC req/s", "gRPC p50 ms", "gRPC p99 ms", "gRPC sidecar CPU µs/req",
              "gRPC / HTTP req/s", "gRPC / HTTP req per CPU-second"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r.concurrency),
                 f"{r.http.requests_per_s:,.0f}", f"{r.http.p50_ms:.3f}", f"{r.http.p99_ms:.3f}",
                 f"{r.http.sidecar_cpu_us:,.0f}",
                 f"{r.grpc.requests_per_s:,.0f}", f"{r.grpc.p50_ms:.3f}", f"{r.grpc.p99_ms:.3f}",
                 f"{r.grpc.sidecar_cpu_us:,.0f}",
                 f"{r.grpc.requests_per_s / max(r.http.requests_per_s, 1e-9):.2f}",
                 f"{r.http.sidecar_cpu_us / max(r.grpc.sidecar_cpu_us, 1e-9):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [(r.concurrency, r.http.errors, r.grpc.errors) for r in rows
              if r.http.errors or r.grpc.errors]
    for n, h, g in errors:
        lines.append(f"\nerrors at concurrency {n}: HTTP {h}, gRPC {g}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    ap.add_argument("--concurrency", type=int_list, default=[1, 32],
                    help="comma-separated client counts (default 1,32)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before each cell")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    pin = can_pin()
    if pin:
        os.sched_setaffinity(0, {LOAD_CORE})
    else:
        log("fewer than 2 cores or no taskset: nothing is pinned")
    with tempfile.TemporaryDirectory() as tmp, running(
        [*pinned(LOAD_CORE, pin), sys.executable, "-m", "tests.support.fake_provider",
         "--port", "0", "--uvloop"], FAKE_READY, "the fake provider", timeout_s=30,
    ) as (fake, _):
        grpc_port = free_port()
        config = Path(tmp) / "sidecar.toml"
        config.write_text(sidecar_config(int(fake.group(2)), grpc_port))
        with running([*pinned(SIDECAR_CORE, pin), sys.executable, "-m", "sidecar", "serve",
                      "--config", str(config)], SIDECAR_READY, "the sidecar",
                     timeout_s=30) as (ready, proc):
            import uvloop

            sidecar = psutil.Process(proc.pid)  # taskset execs the command: the same process
            rows = uvloop.run(bench(sidecar, int(ready.group(2)), grpc_port, args.concurrency,
                                    args.duration, args.warmup))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
