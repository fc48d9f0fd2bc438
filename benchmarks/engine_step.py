"""Where a decode step of the local engine goes, in-process: llama_decode, sampling, the
rest of the step's Python, and a closed loop of requests with no server around it.

    python benchmarks/engine_step.py [--concurrency 8] [--rounds 3] [--greedy both]

Runs :class:`local_models.engine.Engine` on the default model (SmolLM2-135M-Instruct
Q4_1) in this process, on this thread (as the worker does), with 8 parallel sequences and
2048 tokens of context each. Two measurements, each ``--rounds`` times:

* **steps**: ``--concurrency`` greedy 64-token generations started together; the steps in
  which every sequence decodes one token (no prefill) are timed, split into llama_decode,
  sampling (:meth:`~local_models.sampling.SeqSampler.sample`), accepting the token
  (``Engine._accept``: piece, UTF-8, stops, frames) and the rest.
* **closed loop**: ``--concurrency`` clients, 32 requests of 64 tokens with the prompts of
  ``benchmarks/local.py`` (a fresh UUID each); a client sends its next request as soon as
  the last one is done. Aggregate tok/s and p50 time to first token: the ceiling of
  ``local.py``'s figures on this machine, with no HTTP, pipe or client around the engine.

``--greedy`` picks how a temperature-0 token is read: ``argmax`` (numpy's, the default
path), ``llama`` (llama.cpp's greedy sampler, the path before 2026-12-04), or ``both``,
alternated round by round. Timing wraps the engine's methods from the outside (this
script's own overhead is in every row alike). Prints Markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from local import N_CTX_SEQ, N_PARALLEL, model_path, prompt  # noqa: E402

from local_models import engine as engine_module  # noqa: E402
from local_models import protocol as p  # noqa: E402
from local_models.sampling import SeqSampler  # noqa: E402

TOKENS = 64
REQUESTS = 32


class Timers:
    """Seconds spent in wrapped callables, by name."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {"decode": 0.0, "sample": 0.0, "accept": 0.0}

    def wrap(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[key] += time.perf_counter() - start
        return timed


@contextmanager
def instrumented(engine: engine_module.Engine, timers: Timers, greedy: str) -> Iterator[None]:
    """Time llama_decode, sampling and accepting; read greedy tokens as ``greedy`` says."""
    ll = engine.ll
    decode, sample, accept = ll.llama_decode, SeqSampler.sample, engine_module.Engine._accept
    init = SeqSampler.__init__

    def made(self: SeqSampler, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if greedy == "llama":
            self._short = None  # the chain's own greedy (no shortlist redraw either)

    ll.llama_decode = timers.wrap("decode", decode)
    SeqSampler.sample = timers.wrap("sample", sample)  # type: ignore[method-assign]
    SeqSampler.__init__ = made  # type: ignore[method-assign]
    engine_module.Engine._accept = timers.wrap("accept", accept)  # type: ignore[method-assign]
    try:
        yield
    finally:
        ll.llama_decode = decode
        SeqSampler.sample = sample  # type: ignore[method-assign]
        SeqSampler.__init__ = init  # type: ignore[method-assign]
        engine_module.Engine._accept = accept  # type: ignore[method-assign]


class Requests:
    def __init__(self) -> None:
        self.next_id = 0

    def make(self, text: str | None = None) -> p.Generate:
        """A greedy request of :data:`TOKENS` tokens for ``text`` (default: a prompt of
        ``local.py``'s)."""
        self.next_id += 1
        return p.Generate(self.next_id, (p.ChatMessage("user", text or prompt()),), None,
                          TOKENS, sampling=p.Sampling(temperature=0.0))


def full_steps(engine: engine_module.Engine, timers: Timers, requests: Requests,
               concurrency: int) -> dict[str, float]:
    """Milliseconds per step in which all ``concurrency`` sequences decode, by part."""
    for i in range(concurrency):
        engine.waiting.append(requests.make(f"Write a story about a cat number {i}."))
    out: list[p.FromWorker] = []
    total = dict.fromkeys(("step", *timers.spent), 0.0)
    steps = done = 0
    while done < concurrency:
        out.clear()
        full = len(engine.seqs) == concurrency and not any(
            s.prefilling or s.request.tokenizing for s in engine.seqs)
        before = dict(timers.spent)
        start = time.perf_counter()
        engine.step(out)
        took = time.perf_counter() - start
        ended = sum(isinstance(m, p.Done) for m in out)
        done += ended
        if full and not ended:
            steps += 1
            total["step"] += took
            for key, spent in timers.spent.items():
                total[key] += spent - before[key]
    ms = {key: value / max(steps, 1) * 1e3 for key, value in total.items()}
    ms["other"] = ms["step"] - ms["decode"] - ms["sample"] - ms["accept"]
    return ms


def closed_loop(engine: engine_module.Engine, requests: Requests, concurrency: int
                ) -> tuple[float, float]:
    """(aggregate tok/s, p50 TTFT ms) of :data:`REQUESTS` requests from ``concurrency``
    clients that each send the next one when theirs is done."""
    started: dict[int, float] = {}
    first: dict[int, float] = {}
    out: list[p.FromWorker] = []

    def send() -> None:
        req = requests.make()
        started[req.id] = time.perf_counter()
        engine.waiting.append(req)

    for _ in range(concurrency):
        send()
    sent, done, tokens = concurrency, 0, 0
    t0 = time.perf_counter()
    while done < REQUESTS:
        out.clear()
        engine.step(out)
        now = time.perf_counter()
        for m in out:
            if isinstance(m, p.Tokens):
                first.setdefault(m.id, now - started[m.id])
            elif isinstance(m, p.Done):
                done += 1
                tokens += m.completion_tokens
                if sent < REQUESTS:
                    send()
                    sent += 1
    elapsed = time.perf_counter() - t0
    return tokens / elapsed, statistics.median(first.values()) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--greedy", choices=("argmax", "llama", "both"), default="both")
    args = ap.parse_args()
    if not 1 <= args.concurrency <= N_PARALLEL:
        ap.error(f"--concurrency is 1 to {N_PARALLEL} (the engine's parallel sequences)")
    engine = engine_module.Engine(p.Load(str(model_path()), N_CTX_SEQ, N_PARALLEL, None,
                                         args.threads))
    requests = Requests()
    modes = ("argmax", "llama") if args.greedy == "both" else (args.greedy,)
    steps: list[tuple[str, dict[str, float]]] = []
    loops: list[tuple[str, float, float]] = []
    timers = Timers()
    with instrumented(engine, timers, "argmax"):  # warm-up: first decodes are slower
        full_steps(engine, timers, requests, args.concurrency)
    for r in range(args.rounds):
        for mode in modes:
            print(f"round {r + 1}, greedy via {mode}", file=sys.stderr, flush=True)
            timers = Timers()
            with instrumented(engine, timers, mode):
                steps.append((mode, full_steps(engine, timers, requests, args.concurrency)))
            with instrumented(engine, Timers(), mode):
                loops.append((mode, *closed_loop(engine, requests, args.concurrency)))
    print(f"Steps with all {args.concurrency} sequences decoding, ms per step "
          f"(median of {args.rounds} rounds):\n")
    print("| greedy via | step | llama_decode | sampling | accept | other |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in modes:
        rows = [ms for m, ms in steps if m == mode]
        cells = [statistics.median(ms[k] for ms in rows)
                 for k in ("step", "decode", "sample", "accept", "other")]
        print(f"| {mode} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    print(f"\nClosed loop, {args.concurrency} clients, {REQUESTS} requests of {TOKENS} tokens "
          "(each round):\n")
    print("| greedy via | agg tok/s | p50 TTFT ms |")
    print("|---|---|---|")
    for mode in modes:
        rows2 = [(rate, ttft) for m, rate, ttft in loops if m == mode]
        print(f"| {mode} | " + ", ".join(f"{rate:.1f}" for rate, _ in rows2) + " | "
              + ", ".join(f"{ttft:,.0f}" for _, ttft in rows2) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
