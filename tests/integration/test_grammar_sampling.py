"""A grammar's second draw (after the grammar rejected the model's first choice) from the
shortlist of the best-scored tokens is the same draw as over the whole vocabulary: the real
model, the JSON grammar of a schema, llama.cpp's grammar sampler. Greedy decodes give the
same tokens both ways; temperature alone (Gumbel-max) gives the same distribution; greedy
alone read with numpy's argmax gives llama.cpp's greedy sampler's tokens. Runs in
a child process, whose one thread makes every llama.cpp call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.child import child_facts

CHILD = r"""
import ctypes, json, sys
import numpy as np
import llama_cpp
from local_models import protocol as p
from local_models.grammar import schema_grammar
from local_models.sampling import SeqSampler, Vocab

llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=1024, n_threads=2, n_threads_batch=2,
                      verbose=False)
ll, ctx, vocab = llama_cpp, llm._ctx.ctx, llm._model.vocab
v = Vocab(ll, vocab, ll.llama_vocab_n_tokens(vocab))
schema = {"type": "object", "properties": {"title": {"type": "string"},
          "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["title", "tags"]}
grammar = schema_grammar(schema)
asks = ["write a short story about a cat.", "Name three rivers in Europe.",
        "What is 12 times 7?"]

def prompt(ask):
    return llm.tokenize(("<|im_start|>user\n" + ask + "<|im_end|>\n<|im_start|>assistant\n")
                        .encode(), add_bos=False, special=True)

def decode(ask, sampling, shortlist, n=40, argmax=True, constrained=True):
    s = SeqSampler(v, sampling, grammar if constrained else None)
    if not shortlist:
        s._short = None
    if not argmax:  # llama.cpp's own greedy sampler instead of numpy's argmax
        s._short = None
    used = 0
    redraw = s._redraw_short
    def counted(logits):
        nonlocal used
        token = redraw(logits)
        used += token is not None
        return token
    s._redraw_short = counted
    llm.reset()
    llm.eval(prompt(ask))
    out = []
    for _ in range(n):
        token = s.sample(ctx, -1)
        if token is None or ll.llama_vocab_is_eog(vocab, token):
            break
        out.append(token)
        llm.eval([token])
    s.free()
    return out, used, llm.detokenize(out).decode(errors="replace")

facts = {"greedy": []}
for ask in asks:
    fast, used, text = decode(ask, p.Sampling(temperature=0.0), True)
    slow, _, _ = decode(ask, p.Sampling(temperature=0.0), False)
    facts["greedy"].append({"same": fast == slow, "used": used, "text": text})

# Greedy alone is read off the logits with numpy's argmax: the tokens llama.cpp's greedy
# sampler gives, with the grammar and without, over longer answers.
facts["argmax"] = []
for ask in asks:
    for constrained in (False, True):
        fast, _, text = decode(ask, p.Sampling(temperature=0.0), True, 64, True, constrained)
        slow, _, _ = decode(ask, p.Sampling(temperature=0.0), True, 64, False, constrained)
        facts["argmax"].append({"same": fast == slow, "n": len(fast), "text": text})

# Temperature alone: draws after a rejection, against the exact distribution (the softmax
# of logits / T over the tokens the grammar allows at that point).
temp = 1.3
s = SeqSampler(v, p.Sampling(temperature=temp, seed=3), grammar)
llm.reset()
llm.eval(prompt("Say hello."))
logits = np.array(v.logits(ctx, -1), dtype=np.float32)
cur = v.candidates(logits)
ll.llama_sampler_apply(s.grammar, ctypes.byref(cur))
allowed = np.isfinite(v.scratch["logit"])
x = np.where(allowed, logits.astype(np.float64) / temp, -np.inf)
exact = np.exp(x - x.max())
exact /= exact.sum()
draws = 4000
counts = np.zeros(v.n_vocab)
for _ in range(draws):
    counts[s._redraw_short(logits)] += 1
facts["gumbel"] = {"allowed": int(allowed.sum()), "outside": int(counts[~allowed].sum()),
                   "tv": float(0.5 * np.abs(counts / draws - exact).sum()),
                   "drawn": int(counts.sum()),
                   "support": int((exact > 0.01).sum())}
s.free()

# The shortlists in turn: the best allowed token ranks among the 32 best, among the 1,024
# best, or beyond them (then greedy hands the draw back to the whole vocabulary and Gumbel
# filters the whole of it itself). One state, grammars that allow different tokens.
llm.reset()
llm.eval(prompt("Say hello."))
logits = np.array(v.logits(ctx, -1), dtype=np.float32)
rank = np.empty(v.n_vocab, dtype=np.int64)
rank[np.argsort(-logits, kind="stable")] = np.arange(v.n_vocab)
facts["stages"] = []
for rule in ['"The"', '"("', '"~"', "[0-9]+", '"zebra"']:
    s = SeqSampler(v, p.Sampling(temperature=0.0), "root ::= " + rule)
    cur = v.candidates(logits)
    ll.llama_sampler_apply(s.grammar, ctypes.byref(cur))
    allowed = np.isfinite(v.scratch["logit"])
    best = int(np.argmax(np.where(allowed, logits, -np.inf)))
    g = SeqSampler(v, p.Sampling(temperature=0.8, seed=5), "root ::= " + rule)
    drawn = [g._redraw_short(logits) for _ in range(50)]
    facts["stages"].append({"rule": rule, "rank": int(rank[best]), "best": best,
                            "redraw": s._redraw_short(logits),
                            "gumbel_allowed": all(t is not None and allowed[t] for t in drawn)})
    s.free()
    g.free()
print("FACTS " + json.dumps(facts))
"""


@pytest.fixture(scope="module")
def facts(default_model_path: Path) -> dict[str, Any]:
    return child_facts(CHILD, str(default_model_path))


def test_greedy_shortlist_redraws_give_the_tokens_of_the_whole_vocabulary(
        facts: dict[str, Any]) -> None:
    runs = facts["greedy"]
    assert all(r["same"] for r in runs), runs
    # The shortlist was used (the grammar rejected the model's first choices), and the
    # answers follow the schema's start.
    assert sum(r["used"] for r in runs) >= 3, runs
    assert all(r["text"].lstrip().startswith("{") for r in runs), runs


def test_greedy_argmax_gives_the_tokens_of_llama_cpps_greedy_sampler(
        facts: dict[str, Any]) -> None:
    runs = facts["argmax"]
    assert all(r["same"] for r in runs), runs
    assert sum(r["n"] for r in runs) >= 200, runs  # real answers, not empty ones


def test_temperature_redraws_follow_the_grammar_masked_softmax(facts: dict[str, Any]) -> None:
    g = facts["gumbel"]
    assert g["allowed"] >= 1 and g["outside"] == 0 and g["drawn"] == 4000, g
    # 4,000 draws: total variation from the exact distribution stays small (sampling noise
    # alone is about 0.5 * sqrt(support / draws)).
    assert g["tv"] < 0.05 + 0.5 * (g["support"] / 4000) ** 0.5, g


def test_each_shortlist_in_turn_gives_the_best_allowed_token_of_the_vocabulary(
        facts: dict[str, Any]) -> None:
    stages = facts["stages"]
    ranks = [st["rank"] for st in stages]
    # The grammars' best allowed tokens fall in each shortlist and beyond them.
    assert min(ranks) < 32 and any(32 <= r < 1024 for r in ranks) and max(ranks) >= 1024, stages
    for st in stages:
        if st["rank"] < 1024:
            assert st["redraw"] == st["best"], st
        else:  # beyond the shortlists: greedy leaves the draw to the whole vocabulary
            assert st["redraw"] is None, st
        assert st["gumbel_allowed"], st
