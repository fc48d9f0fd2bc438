"""The engine's new sampling features on the real model, in a child process: per-sequence
grammars in one batch, n choices sharing one prefill, log-probabilities, logit bias, seeds.

The engine runs in a subprocess (llama.cpp's compute never runs in the pytest process);
the child prints one JSON object of facts that the tests assert on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.child import child_facts

CHILD = r"""
import json, sys
from local_models import protocol as p
from local_models.engine import Engine
from local_models.grammar import schema_grammar

e = Engine(p.Load(path=sys.argv[1], n_ctx=1024, n_parallel=4, n_gpu_layers=0, n_threads=2,
                  prefix_cache=True))

def run(*reqs):
    out = []
    e.waiting.extend(reqs)
    while e.seqs or e.waiting:
        e.step(out)
    return out

def texts(out, rid, n=1):
    return ["".join(m.text for m in out if isinstance(m, p.Tokens) and m.id == rid
                    and m.index == i) for i in range(n)]

def done(out, rid):
    [d] = [m for m in out if isinstance(m, (p.Done, p.Failed)) and m.id == rid]
    return d

ask = (p.ChatMessage("user", "Give me a person as JSON."),)
schema = {"type": "object", "properties": {"name": {"type": "string"},
          "age": {"type": "integer"}}, "required": ["name", "age"],
          "additionalProperties": False}
grammar = schema_grammar(schema)
hot = p.Sampling(temperature=1.0, seed=1)
facts = {}

# two constrained and two free sequences in one batch
out = run(p.Generate(1, ask, None, 80, grammar=grammar, sampling=hot),
          p.Generate(2, ask, None, 20, sampling=hot),
          p.Generate(3, ask, None, 80, grammar=grammar,
                     sampling=p.Sampling(temperature=1.0, seed=2)),
          p.Generate(4, ask, None, 20, sampling=hot))
facts["constrained"] = [texts(out, 1)[0], texts(out, 3)[0]]
facts["constrained_reasons"] = [done(out, 1).finish_reason, done(out, 3).finish_reason]
facts["free"] = [texts(out, 2)[0], texts(out, 4)[0]]

# n choices: one prefill
prompt_len = len(e.prompt_tokens(p.Generate(0, ask, None, 1)))
before = e.fed
out = run(p.Generate(5, ask, None, 10, n=3, sampling=hot))
d = done(out, 5)
facts["n_texts"] = texts(out, 5, 3)
facts["n_done"] = [d.prompt_tokens, d.completion_tokens, list(d.finish_reasons)]
facts["n_cached"] = d.cached_tokens
facts["n_fed"] = e.fed - before
facts["prompt_len"] = prompt_len
facts["n_again"] = texts(run(p.Generate(6, ask, None, 10, n=3, sampling=hot)), 6, 3)
facts["n_too_many"] = done(run(p.Generate(7, ask, None, 10, n=5)), 7).message

# log-probabilities, greedy
out = run(p.Generate(8, ask, None, 6, sampling=p.Sampling(temperature=0), logprobs=3))
lps = [lp for m in out if isinstance(m, p.Tokens) for lp in m.logprobs]
facts["logprobs"] = [[lp.piece.decode("utf-8", "replace"), lp.logprob,
                      [[b.decode("utf-8", "replace"), x] for b, x in lp.top]] for lp in lps]
facts["logprobs_text"] = texts(out, 8)[0]

# logit bias: ban the greedy first token, force another
first = lps[0]
[tok] = [t for t in range(e.n_vocab) if e._piece_bytes(t) == first.piece][:1]
out = run(p.Generate(9, ask, None, 1, sampling=p.Sampling(temperature=0,
                                                          logit_bias=((tok, -100.0),))))
facts["banned_first"] = texts(out, 9)[0]
force = p.Sampling(temperature=0, logit_bias=((tok, -100.0), (42, 100.0)))
out = run(p.Generate(10, ask, None, 1, sampling=force))
facts["forced"] = [texts(out, 10)[0], e._piece(42)]
facts["bias_bad"] = done(run(p.Generate(11, ask, None, 1, sampling=p.Sampling(
    logit_bias=((10**6, 1.0),)))), 11).message
facts["grammar_bad"] = done(run(p.Generate(12, ask, None, 1, grammar="root ::= nope")), 12).message
facts["first_piece"] = first.piece.decode("utf-8", "replace")

# embeddings of token ids equal those of the text
ids = tuple(e.tokenize("hello world", special=False, add_bos=False))
e.embedder.submit(p.Embed(13, ("hello world", ids, (10**6,))))
out = []
while e.embedder.jobs:
    e.embedder.turn(out)
facts["embed"] = [type(m).__name__ for m in out]
facts["embed_msg"] = getattr(out[-1], "message", "")
e.embedder.submit(p.Embed(14, ("hello world", ids)))
out = []
while e.embedder.jobs:
    e.embedder.turn(out)
facts["embed_same"] = out[-1].vectors[0] == out[-1].vectors[1]
print("FACTS " + json.dumps(facts))
"""


@pytest.fixture(scope="module")
def facts(default_model_path: Path) -> dict[str, Any]:
    return child_facts(CHILD, str(default_model_path))


def test_each_sequence_follows_its_own_grammar_in_one_batch(facts: dict[str, Any]) -> None:
    for text in facts["constrained"]:
        value = json.loads(text)
        assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    assert facts["constrained_reasons"] == ["stop", "stop"]
    # the free sequences of the same batch are not constrained
    assert not all(t.lstrip().startswith("{") for t in facts["free"])


def test_n_choices_share_one_prefill(facts: dict[str, Any]) -> None:
    prompt_tokens, completion_tokens, reasons = facts["n_done"]
    assert prompt_tokens == facts["prompt_len"]
    assert completion_tokens == 30 and reasons == ["length"] * 3
    # the prompt decoded once (what earlier requests left in the slot reused), then each
    # choice's tokens but its last
    assert 0 < facts["n_cached"] < facts["prompt_len"]
    assert facts["n_fed"] == facts["prompt_len"] - facts["n_cached"] + 3 * (10 - 1)
    assert len(set(facts["n_texts"])) == 3  # seed + index: three different choices
    assert facts["n_again"] == facts["n_texts"]  # and reproducible
    assert "n = 5" in facts["n_too_many"]


def test_logprobs_are_the_models_distribution(facts: dict[str, Any]) -> None:
    entries = facts["logprobs"]
    assert len(entries) == 6
    assert "".join(piece for piece, _, _ in entries) == facts["logprobs_text"]
    for piece, logprob, top in entries:
        assert len(top) == 3 and logprob <= 0
        assert top[0][0] == piece and top[0][1] == pytest.approx(logprob)  # greedy
        assert [x for _, x in top] == sorted((x for _, x in top), reverse=True)


def test_logit_bias_bans_and_forces(facts: dict[str, Any]) -> None:
    assert facts["banned_first"] != facts["first_piece"]
    assert facts["forced"][0] == facts["forced"][1]
    assert "logit_bias names token 1000000" in facts["bias_bad"]
    assert "grammar" in facts["grammar_bad"]


def test_token_id_embeddings(facts: dict[str, Any]) -> None:
    assert facts["embed"] == ["Failed"]
    assert "input[2] has token 1000000" in facts["embed_msg"]
    assert facts["embed_same"]
