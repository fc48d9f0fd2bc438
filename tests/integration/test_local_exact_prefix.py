"""Exact prompt-prefix reuse (``prefix_cache = "exact"``, the default) on the real model:
a chat prompt's part before its last message is prefilled in batches of its own, cut the
same way every time, and reused only whole, so an answer with reuse is the very answer the
same request gets from an engine that has nothing cached: same tokens and bit-identical
log-probabilities, even when the reused part was prefilled beside other sequences'
decode rows. Runs in a child process, whose one thread makes every llama.cpp call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.child import child_facts

CHILD = r"""
import json, sys
from local_models import protocol as p
from local_models.engine import Engine

def engine(n_batch=512):
    return Engine(p.Load(path=sys.argv[1], n_ctx=1024, n_parallel=4, n_gpu_layers=0,
                         n_threads=2, n_batch=n_batch))  # prefix_cache: its default

def run(e, *reqs, before=()):
    out = []
    e.waiting.extend(before)
    for _ in range(3):  # the other sequences get a few steps first
        e.step(out)
    e.waiting.extend(reqs)
    while e.seqs or e.waiting:
        e.step(out)
    return out

def answer(out, rid):
    tokens = [(m.text, [lp.logprob for lp in m.logprobs]) for m in out
              if isinstance(m, p.Tokens) and m.id == rid]
    [d] = [m for m in out if isinstance(m, (p.Done, p.Failed)) and m.id == rid]
    return {"text": "".join(t for t, _ in tokens), "lps": [x for _, l in tokens for x in l],
            "cached": d.cached_tokens, "prompt": d.prompt_tokens}

SYSTEM = ("You are the assistant of a small bakery. Answer in one or two short sentences, "
          "name prices in euros, and never invent opening hours. ") * 6
greedy = p.Sampling(temperature=0)

def chat(rid, question, system=SYSTEM, max_tokens=24):
    msgs = (p.ChatMessage("system", system),) if system else ()
    return p.Generate(rid, (*msgs, p.ChatMessage("user", question)), None, max_tokens,
                      sampling=greedy, logprobs=0)

facts = {}
for n_batch in (512, 64):  # 64: the reused part is prefilled in several canonical chunks
    warm = engine(n_batch)
    other = p.Generate(100, None, "Once upon a time", 40, sampling=greedy)
    first = answer(run(warm, chat(1, "How much is a croissant?"), before=[other]), 1)
    reused = answer(run(warm, chat(2, "Do you sell rye bread?")), 2)
    fresh = answer(run(engine(n_batch), chat(2, "Do you sell rye bread?")), 2)
    no_system = [answer(run(warm, chat(i, q, system=None)), i)
                 for i, q in ((3, "Name a river."), (4, "Name a mountain."))]
    fresh_ns = answer(run(engine(n_batch), chat(4, "Name a mountain.", system=None)), 4)
    other_system = answer(run(warm, chat(5, "Hello?", system="Be brief.")), 5)
    facts[n_batch] = {"first": first, "reused": reused, "fresh": fresh,
                      "no_system": no_system, "fresh_ns": fresh_ns,
                      "other_system": other_system}
print("FACTS " + json.dumps(facts))
"""


@pytest.fixture(scope="module")
def facts(default_model_path: Path) -> dict[str, Any]:
    return child_facts(CHILD, str(default_model_path), timeout=600)


@pytest.mark.parametrize("n_batch", ["512", "64"])
def test_a_reused_system_prompt_gives_the_answer_of_a_fresh_engine(facts: dict[str, Any],
                                                                    n_batch: str) -> None:
    f = facts[n_batch]
    # The first request prefilled its system prompt beside another sequence's decode rows;
    # the second reuses all of it (up to where its question starts) and nothing more.
    assert f["first"]["cached"] == 0
    assert f["reused"]["cached"] > 100
    assert f["reused"]["cached"] < f["reused"]["prompt"] - 5
    assert f["fresh"]["cached"] == 0
    assert f["reused"]["text"] and f["reused"]["text"] == f["fresh"]["text"]
    assert f["reused"]["lps"] == f["fresh"]["lps"]  # bit for bit, not close


@pytest.mark.parametrize("n_batch", ["512", "64"])
def test_the_templates_default_system_prompt_is_reused_too(facts: dict[str, Any],
                                                           n_batch: str) -> None:
    f = facts[n_batch]
    river, mountain = f["no_system"]
    assert mountain["cached"] > 10  # SmolLM2's template writes a default system prompt
    assert mountain["text"] == f["fresh_ns"]["text"]
    assert mountain["lps"] == f["fresh_ns"]["lps"]
    assert river["prompt"] > river["cached"]


def test_another_system_prompt_reuses_nothing(facts: dict[str, Any]) -> None:
    assert facts["512"]["other_system"]["cached"] == 0
    assert facts["512"]["other_system"]["text"]
