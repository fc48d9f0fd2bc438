"""Prompt-prefix KV reuse: time to first token at concurrency 1, the sidecar with its
``prefix_cache`` off, exact and on, next to llama-server (whose ``cache_prompt`` is on by default).

Two workloads, each at concurrency 1 (one request after another), greedy, streamed:

* ``system``: a long system prompt shared by every request (about 500 tokens: a shop
  assistant's rules), then a unique one-line question;
* ``chat``: multi-turn conversations; every turn sends the whole conversation so far (a short
  system prompt, the earlier questions and the server's own earlier answers) plus a new
  question, as a chat client does.

Servers, one after another on the same model file and machine (never two at once):

* ``sidecar-off``: ``sidecar serve`` with the default model's settings and
  ``prefix_cache = false`` (every prompt prefilled whole);
* ``sidecar-exact``: the same with ``prefix_cache = "exact"`` (the default: the part
  before the last message, reused only whole);
* ``sidecar-on``: the same with ``prefix_cache = true`` (the longest common prefix);
* ``llama-server``: llama.cpp's server, 8 slots (``cache_prompt`` on, its default);
* ``llama-server-nocache``: the same server with ``"cache_prompt": false`` in every request.

    python benchmarks/prefix.py [--servers sidecar-off,sidecar-exact,sidecar-on,llama-server]
                                [--requests 16] [--conversations 3] [--turns 6]
                                [--max-tokens 32]

Per server and workload: p50 / mean TTFT (to the first content chunk), the median prompt
tokens and the median cached prompt tokens the server reported (the sidecar's
``usage.prompt_tokens_details.cached_tokens``; llama-server's ``timings.cache_n``). Prints
Markdown tables on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import choices, exit_on_sigterm, log
from local import (
    CHAT_PATH,
    MODEL_NAME,
    add_quiet_flags,
    cpu_count,
    find_llama_server,
    fmt_ms,
    load_avg,
    model_path,
    running_server,
    sidecar_config,
    wait_quiet,
)
from system_prompt import SYSTEM

SERVERS = ("sidecar-off", "sidecar-exact", "sidecar-on", "llama-server",
           "llama-server-nocache")
DEFAULT_SERVERS = ("sidecar-off", "sidecar-exact", "sidecar-on", "llama-server")
PREFIX_CACHE: dict[str, bool | str] = {"sidecar-off": False, "sidecar-exact": "exact",
                                       "sidecar-on": True}

QUESTIONS = (
    "How much is a croissant?", "Do you sell rye bread?", "Can I bring my dog inside?",
    "What goes well with a cappuccino?", "Is the cheesecake gluten free?",
    "Can I order a whole black forest cake for Saturday?", "Where can I park?",
    "Do you deliver to the office?", "How much is tea with soy milk?",
    "What do you have for Christmas?", "Are gift vouchers available?",
    "How many seats are there on the terrace?",
)

CHAT_SYSTEM = "You are a helpful assistant. Answer briefly."
CHAT_TURNS = (
    "I am planning a weekend trip to a city by the sea. What should I pack?",
    "What about shoes, if I want to walk a lot?",
    "And if it rains the whole weekend, what can I do indoors?",
    "Suggest a simple dinner I could cook in a small holiday flat.",
    "What should I check before I leave the flat on the last day?",
    "Thanks. Summarise the plan in three short points.",
    "One more thing: how early should I get to the train station?",
    "And what snacks travel well?",
)


@dataclass
class Sample:
    workload: str
    turn: int  # 0 for the system workload; 1.. for the chat's turns
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    text: str = ""
    error: str | None = None


@dataclass
class Run:
    server: str
    samples: list[Sample] = field(default_factory=list)
    other_cores: float = 0.0


async def one(client: httpx.AsyncClient, url: str, messages: list[dict[str, str]],
              max_tokens: int, sample: Sample, cache_prompt: bool | None) -> Sample:
    body: dict[str, Any] = {
        "model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }
    if cache_prompt is not None:
        body["cache_prompt"] = cache_prompt
    start = time.perf_counter()
    parts: list[str] = []
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                sample.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return sample
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    sample.error = json.dumps(event["error"])[:200]
                    return sample
                for choice in event.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if sample.ttft_s is None:
                            sample.ttft_s = time.perf_counter() - start
                        parts.append(content)
                if usage := event.get("usage"):
                    sample.prompt_tokens = usage.get("prompt_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    if details.get("cached_tokens") is not None:
                        sample.cached_tokens = details["cached_tokens"]
                if (timings := event.get("timings")) and "cache_n" in timings:
                    sample.cached_tokens = timings["cache_n"]  # llama-server's own count
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:200]
        return sample
    sample.text = "".join(parts)
    if sample.ttft_s is None:
        sample.error = "no content"
    return sample


async def workloads(base_url: str, requests: int, conversations: int, turns: int,
                    max_tokens: int, cache_prompt: bool | None) -> list[Sample]:
    url = base_url + CHAT_PATH
    out: list[Sample] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10)) as client:
        for i in range(requests):
            question = f"(ticket {uuid.uuid4().hex[:8]}) {QUESTIONS[i % len(QUESTIONS)]}"
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": question}]
            out.append(await one(client, url, messages, max_tokens, Sample("system", 0),
                                 cache_prompt))
        for _ in range(conversations):
            messages = [{"role": "system", "content": CHAT_SYSTEM}]
            for t in range(turns):
                question = CHAT_TURNS[t % len(CHAT_TURNS)]
                if t == 0:
                    question = f"(conversation {uuid.uuid4().hex[:8]}) {question}"
                messages.append({"role": "user", "content": question})
                s = await one(client, url, list(messages), max_tokens, Sample("chat", t + 1),
                              cache_prompt)
                out.append(s)
                messages.append({"role": "assistant", "content": s.text or "OK."})
    return out


def bench(name: str, model: Path, workdir: Path, threads: int, llama_server: Path | None,
          args: argparse.Namespace) -> Run:
    kind = "sidecar" if name.startswith("sidecar") else "llama-server"
    config = sidecar_config(workdir, PREFIX_CACHE[name]) if kind == "sidecar" else None
    cache_prompt = False if name == "llama-server-nocache" else None
    with running_server(kind, model, workdir, threads, llama_server, config,
                        label=name) as server:
        log(f"{name}: ready at {server.base_url}; warming up")
        warm = asyncio.run(workloads(server.base_url, 1, 0, 0, 8, cache_prompt))
        if warm[0].error:
            raise RuntimeError(f"{name}: warm-up failed: {warm[0].error}")
        run = Run(name)
        from cpu_meter import CpuMeter

        wait_quiet([server.proc.pid], args.quiet_cores, args.quiet_wait)
        meter = CpuMeter([server.proc.pid])
        run.samples = asyncio.run(workloads(server.base_url, args.requests,
                                            args.conversations, args.turns,
                                            args.max_tokens, cache_prompt))
        run.other_cores = meter.other_cores()
        for e in sorted({s.error for s in run.samples if s.error})[:5]:
            log(f"  error: {e}")
        log(f"{name}: done ({run.other_cores:.2f} cores used elsewhere)")
    return run


def _median(values: Sequence[float | int | None]) -> float | None:
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


def _ms(samples: Sequence[Sample], how: str) -> float | None:
    values = [s.ttft_s * 1000 for s in samples if s.ttft_s is not None]
    if not values:
        return None
    return statistics.median(values) if how == "p50" else statistics.fmean(values)


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(runs: Sequence[Run]) -> str:
    out: list[str] = []
    header = ["workload", "server", "requests", "p50 TTFT ms", "mean TTFT ms",
              "median prompt tokens", "median cached tokens", "errors", "other CPU"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups = (("system prompt", lambda s: s.workload == "system"),
              ("chat, turns 2+", lambda s: s.workload == "chat" and s.turn > 1),
              ("chat, turn 1", lambda s: s.workload == "chat" and s.turn == 1))
    for title, keep in groups:
        for run in runs:
            samples = [s for s in run.samples if keep(s)]
            ok = [s for s in samples if s.error is None]
            out.append("| " + " | ".join([
                title, run.server, str(len(samples)), fmt_ms(_ms(ok, "p50")),
                fmt_ms(_ms(ok, "mean")), _n(_median([s.prompt_tokens for s in ok])),
                _n(_median([s.cached_tokens for s in ok])),
                str(len(samples) - len(ok)), f"{run.other_cores:.2f}"]) + " |")
    by = {r.server: r for r in runs}
    pairs = [(a, b) for a, b in (("sidecar-exact", "sidecar-off"),
                                 ("sidecar-exact", "llama-server"),
                                 ("sidecar-on", "sidecar-off"), ("sidecar-on", "llama-server"),
                                 ("llama-server", "llama-server-nocache"))
             if a in by and b in by]
    if pairs:
        out += ["", "| workload | " + " | ".join(f"{a} / {b} p50 TTFT" for a, b in pairs)
                + " |", "|---|" + "---|" * len(pairs)]
        for title, keep in groups[:2]:
            cells = []
            for a, b in pairs:
                ma = _ms([s for s in by[a].samples if keep(s) and not s.error], "p50")
                mb = _ms([s for s in by[b].samples if keep(s) and not s.error], "p50")
                cells.append("-" if ma is None or not mb else f"{ma / mb:.2f}")
            out.append(f"| {title} | " + " | ".join(cells) + " |")
    if "chat" in {s.workload for r in runs for s in r.samples}:
        turns = sorted({s.turn for r in runs for s in r.samples if s.workload == "chat"})
        out += ["", "p50 TTFT ms per chat turn (prompt tokens grow with the conversation):", "",
                "| server | " + " | ".join(f"turn {t}" for t in turns) + " |",
                "|---|" + "---|" * len(turns)]
        for run in runs:
            cells = [fmt_ms(_ms([s for s in run.samples if s.workload == "chat"
                                 and s.turn == t and not s.error], "p50")) for t in turns]
            out.append(f"| {run.server} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--servers", type=lambda t: choices(t, SERVERS), default=list(DEFAULT_SERVERS),
                   help=f"comma separated subset of {','.join(SERVERS)} "
                        f"(default {','.join(DEFAULT_SERVERS)})")
    p.add_argument("--requests", type=int, default=16,
                   help="requests of the system-prompt workload (default 16)")
    p.add_argument("--conversations", type=int, default=3, help="chats (default 3)")
    p.add_argument("--turns", type=int, default=6, help="turns per chat (default 6)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens (default 32)")
    p.add_argument("--threads", type=int, default=cpu_count(),
                   help="llama-server's threads (default: the cores we may use; the sidecar "
                        "uses one per physical core)")
    p.add_argument("--llama-server", type=Path, default=None,
                   help="llama-server binary (default: scripts/build-llama-server.sh's)")
    add_quiet_flags(p, before="each server's run", wait_s=60)
    args = p.parse_args(argv)
    if args.requests < 1 or args.conversations < 0 or args.turns < 1 or args.max_tokens < 1:
        p.error("--requests, --turns and --max-tokens must be >= 1, --conversations >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    model = model_path()
    needs_server = any(s.startswith("llama-server") for s in args.servers)
    llama_server = find_llama_server(args.llama_server) if needs_server else None
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    log(f"model {model}; {cpu_count()} cores; load {load_avg()}")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-prefix-") as tmp:
        for name in args.servers:
            try:
                runs.append(bench(name, model, Path(tmp), args.threads, llama_server, args))
            except RuntimeError as exc:
                log(f"{name}: FAILED: {exc}")
    log(f"done; load {load_avg()}")
    print(markdown(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
