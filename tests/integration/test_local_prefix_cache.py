"""Prompt-prefix KV reuse on the real model: two engines in a child process, one with the
reuse on and one with it off, answer the same requests; the tests compare them.

The engine runs in a subprocess (llama.cpp's compute never runs in the pytest process);
the child prints one JSON object of facts that the tests assert on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.child import child_facts

CHILD = r"""
import json, sys
from local_models import protocol as p
from local_models.engine import Engine

def engine(cache, n_batch=512, n_parallel=4):
    return Engine(p.Load(path=sys.argv[1], n_ctx=1024, n_parallel=n_parallel, n_gpu_layers=0,
                         n_threads=2, prefix_cache=cache, n_batch=n_batch))

on, off = engine(True), engine(False)
refs = {}
greedy = p.Sampling(temperature=0)
SYSTEM = ("You are a careful assistant for a small bakery. Answer in one or two short "
          "sentences, name prices in euros, and never invent opening hours. ") * 3

def run(e, *reqs, cancel_after=None):
    out = []
    e.waiting.extend(reqs)
    steps = 0
    while e.seqs or e.waiting:
        e.step(out)
        steps += 1
        if cancel_after is not None and steps == cancel_after:
            for r in reqs:
                e.cancel(r.id, out.append)
    return out

def texts(out, rid, n=1):
    return ["".join(m.text for m in out if isinstance(m, p.Tokens) and m.id == rid
                    and m.index == i) for i in range(n)]

def first_logprob(out, rid):
    return next(lp.logprob for m in out if isinstance(m, p.Tokens) and m.id == rid
                for lp in m.logprobs)

def done(out, rid):
    [d] = [m for m in out if isinstance(m, (p.Done, p.Failed)) and m.id == rid]
    return d

def both(make):
    # The same requests with reuse (on), without (off: the prompt prefilled whole), and,
    # for one request, without reuse but prefilled in steps cut where the reuse cut it
    # (ref: n_batch = the cached length), which must give the very same tokens: llama.cpp's
    # results depend on how a prompt is cut into batches, not only on the tokens.
    before = on.fed
    a = run(on, *make())
    fed = on.fed - before
    b = run(off, *make())
    reqs = make()
    case = {"on": [texts(a, r.id, r.n) for r in reqs],
            "off": [texts(b, r.id, r.n) for r in reqs],
            "lp_on": [first_logprob(a, r.id) for r in reqs],
            "lp_off": [first_logprob(b, r.id) for r in reqs],
            "cached": [done(a, r.id).cached_tokens for r in reqs],
            "cached_off": [done(b, r.id).cached_tokens for r in reqs],
            "prompt": [done(a, r.id).prompt_tokens for r in reqs],
            "fed": fed}
    # what reuse leaves to decode: the rest of the prompt, then each choice's tokens but
    # one that ended it at its length (an end-of-generation token is not decoded)
    ds = [done(a, r.id) for r in reqs]
    case["fed_expected"] = sum(d.prompt_tokens - d.cached_tokens + d.completion_tokens
                               - (d.finish_reasons or (d.finish_reason,)).count("length")
                               for d in ds)
    if len(reqs) == 1 and case["cached"][0] > 0:
        cut = max(case["cached"][0], 4)
        if cut not in refs:
            refs[cut] = engine(False, n_batch=cut, n_parallel=3)
        [r] = reqs
        case["ref"] = [texts(run(refs[cut], r), r.id, r.n)]
    return case

def chat(rid, *turns, max_tokens=24, **kw):
    msgs = [p.ChatMessage("system", SYSTEM)]
    for i, t in enumerate(turns):
        msgs.append(p.ChatMessage("user" if i % 2 == 0 else "assistant", t))
    return p.Generate(rid, tuple(msgs), None, max_tokens, sampling=kw.pop("sampling", greedy),
                      logprobs=0, **kw)

facts = {}
facts["system_len"] = len(on.prompt_tokens(chat(0, "")))

# a shared system prompt: the first request fills a slot, the next ones reuse its prefix
facts["first"] = both(lambda: [chat(1, "How much is a croissant?")])
facts["shared"] = both(lambda: [chat(2, "Do you sell rye bread?")])
facts["shared_again"] = both(lambda: [chat(3, "What goes well with coffee?")])
# the same prompt again: matched whole, its last token decoded again for the logits
facts["same"] = both(lambda: [chat(6, "What goes well with coffee?")])

# multi-turn: the second turn's prompt starts with the first turn and its answer
q1 = "Recommend a cake for a birthday."
answer = both(lambda: [chat(4, q1, max_tokens=40)])["on"][0][0]
facts["turn2"] = both(lambda: [chat(5, q1, answer, "And one without nuts?", max_tokens=40)])
facts["turn1_prompt"] = len(on.prompt_tokens(chat(0, q1)))

# a prompt that shares nothing with any slot's cache (a plain text completion): it
# takes an empty slot, not the one that keeps the system prompt
facts["unrelated"] = both(lambda: [p.Generate(7, None, "The capital of France is", 16,
                                              sampling=greedy, logprobs=0)])
# n > 1 after reuse: one prefill of the rest, forks copy it, seeded choices
hot = p.Sampling(temperature=1.0, seed=7)
text_prompt = on.prompt_tokens(p.Generate(0, None, "The capital of France is", 1))
[text_slot] = [s for s, k in enumerate(on.slots.kept) if k[:len(text_prompt)] == text_prompt]
facts["unrelated_slot"] = text_slot
facts["system_slot_kept"] = len(on.slots.kept[0])
facts["forks"] = both(lambda: [chat(12, "Suggest a pastry.", n=3, sampling=hot,
                                    max_tokens=12)])
fork_prompt = on.prompt_tokens(chat(12, "Suggest a pastry."))
facts["fork_replaced_text"] = on.slots.kept[text_slot][:len(fork_prompt)] == fork_prompt
facts["after_forks"] = both(lambda: [chat(13, "Suggest a pastry.", max_tokens=12)])

# a grammar after reuse
facts["grammar"] = both(lambda: [chat(14, "A number, please.", grammar="root ::= [0-9]+",
                                      max_tokens=6)])

# cancelled mid-prefill (a long new tail), then the same prompt is answered in full
long_q = "Tell me about your breads. " * 100  # more than one step's n_batch (512)
cancelled = run(on, chat(15, long_q), cancel_after=1)
facts["cancelled"] = done(cancelled, 15).finish_reason
facts["after_cancel"] = both(lambda: [chat(16, long_q, max_tokens=12)])

# four at once, all slots busy, with and without shared prefixes
facts["batch"] = both(lambda: [chat(8, "Do you sell rye bread?"),
                               chat(9, "Is the bakery open on Sunday?"),
                               p.Generate(10, None, "Once upon a time", 20, sampling=greedy,
                                          logprobs=0),
                               chat(11, q1, answer, "And one without nuts?")])

# slots: two conversations at once, then each finds its own slot's cache again
qa, qb = "Conversation A: " + "alpha " * 60, "Conversation B: " + "beta " * 60
pair = both(lambda: [chat(17, qa), chat(18, qb)])
facts["a2"] = both(lambda: [chat(19, qa, pair["on"][0][0], "Next?")])
facts["b2"] = both(lambda: [chat(20, qb, pair["on"][1][0], "Next?")])
facts["a_len"] = len(on.prompt_tokens(chat(0, qa)))
facts["free_after"] = [on.slots.available(), on.slots.reserved, off.slots.available()]
facts["kept_consistent"] = all(
    len(k) == on.ll.llama_memory_seq_pos_max(on.memory, s) + 1
    for s, k in enumerate(on.slots.kept))
facts["off_kept"] = [len(k) for k in off.slots.kept]
print("FACTS " + json.dumps(facts))
"""


@pytest.fixture(scope="module")
def facts(default_model_path: Path) -> dict[str, Any]:
    return child_facts(CHILD, str(default_model_path))


def _same_as_without_reuse(case: dict[str, Any]) -> None:
    """The very same tokens as without reuse, the prompt cut into the same batches."""
    assert case["on"] == case["ref"]
    assert all(c == 0 for c in case["cached_off"])


def _close_to_a_whole_prefill(case: dict[str, Any]) -> None:
    """Prefilled whole the prompt gives (llama.cpp's numbers depend on the batches) the
    first token's log-probability within 0.25, and the same first token."""
    for lp_on, lp_off in zip(case["lp_on"], case["lp_off"], strict=True):
        assert abs(lp_on - lp_off) < 0.25
    for on, off in zip(case["on"], case["off"], strict=True):
        assert [t.split(" ")[0] for t in on] == [t.split(" ")[0] for t in off]


def test_a_shared_system_prompt_is_prefilled_once(facts: dict[str, Any]) -> None:
    first = facts["first"]
    assert first["cached"] == [0] and first["on"] == first["off"]
    system = facts["system_len"]
    for case in (facts["shared"], facts["shared_again"]):
        _same_as_without_reuse(case)
        _close_to_a_whole_prefill(case)
        [cached] = case["cached"]
        assert system - 8 <= cached < case["prompt"][0]  # the system turn, not the question
        # only the rest of the prompt is decoded, then each token but the last
        assert case["fed"] == case["fed_expected"]  # the rest of the prompt, then its tokens


def test_a_multi_turn_chat_reuses_the_first_turn_and_its_answer(facts: dict[str, Any]) -> None:
    turn2 = facts["turn2"]
    _close_to_a_whole_prefill(turn2)
    [cached] = turn2["cached"]
    assert cached > facts["turn1_prompt"]  # the whole first prompt and part of the answer
    assert turn2["fed"] == turn2["fed_expected"]


def test_a_prompt_matched_whole_decodes_its_last_token_again(facts: dict[str, Any]) -> None:
    same = facts["same"]
    _same_as_without_reuse(same)
    assert same["cached"] == [same["prompt"][0] - 1]
    assert same["on"] == facts["shared_again"]["on"]  # the answer it gave that prompt before


def test_other_prompts_in_slots_with_cached_kv_are_not_corrupted(
        facts: dict[str, Any]) -> None:
    unrelated = facts["unrelated"]
    assert unrelated["cached"][0] <= 1  # at most a BOS token in common
    assert unrelated["on"] == unrelated["off"]
    # it took an empty slot, not slot 0 with the system prompt; then a fork replaced it
    assert facts["unrelated_slot"] != 0 and facts["system_slot_kept"] > facts["system_len"]
    assert facts["fork_replaced_text"]
    batch = facts["batch"]
    _close_to_a_whole_prefill(batch)
    assert batch["cached"][2] <= 1 and batch["cached"][0] > 0 and batch["cached"][3] > 0
    assert batch["fed"] == batch["fed_expected"]
    after_cancel = facts["after_cancel"]
    _same_as_without_reuse(after_cancel)
    assert facts["cancelled"] == "cancelled"
    assert after_cancel["cached"][0] >= 512  # what the cancelled prefill had decoded
    grammar = facts["grammar"]
    _same_as_without_reuse(grammar)
    assert grammar["on"][0][0].isdigit()


def test_n_choices_after_reuse(facts: dict[str, Any]) -> None:
    forks = facts["forks"]
    _same_as_without_reuse(forks)
    [cached] = forks["cached"]
    assert cached >= facts["system_len"] - 8
    assert len(set(forks["on"][0])) == 3
    assert forks["fed"] == forks["fed_expected"]  # one prefill of the rest for 3 choices
    # a fork's slot now holds the forked prompt: the next request reuses it
    after = facts["after_forks"]
    _close_to_a_whole_prefill(after)  # its last prompt token now decoded in a step alone
    assert after["cached"] == [forks["prompt"][0] - 1]


def test_each_conversation_finds_its_own_slot(facts: dict[str, Any]) -> None:
    for key in ("a2", "b2"):
        _close_to_a_whole_prefill(facts[key])
        assert facts[key]["cached"][0] > facts["a_len"]
    assert facts["free_after"] == [4, 0, 4]
    assert facts["kept_consistent"]  # the bookkeeping matches llama.cpp's cells
    assert facts["off_kept"] == [0, 0, 0, 0]  # reuse off keeps nothing
